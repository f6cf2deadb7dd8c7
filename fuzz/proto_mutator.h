#ifndef MOE_FUZZ_PROTO_MUTATOR_H_
#define MOE_FUZZ_PROTO_MUTATOR_H_

// A structure-aware libFuzzer mutator for protobuf messages (Debian has no
// libprotobuf-mutator): the input is parsed as the target's message, a few fields anywhere in it
// are changed through reflection (boundary numbers, NaN and infinities, flipped or resized
// bytes, repeated fields grown, shrunk or emptied, submessages set or cleared), and the result is
// serialized back. Inputs that do not parse start from an empty message. `MOE_PROTO_FUZZER(Msg)`
// defines LLVMFuzzerCustomMutator for a target whose LLVMFuzzerTestOneInput parses `Msg`.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>

#include <google/protobuf/descriptor.h>
#include <google/protobuf/message.h>

extern "C" size_t LLVMFuzzerMutate(uint8_t* data, size_t size, size_t max_size);

namespace moe::fuzz {

class ProtoMutator {
 public:
  explicit ProtoMutator(uint32_t seed) : rng_(seed) {}

  // Changes one field somewhere in `m` (descending into submessages).
  void Mutate(google::protobuf::Message* m, int depth = 0) {
    using google::protobuf::FieldDescriptor;
    const google::protobuf::Descriptor* d = m->GetDescriptor();
    if (d->field_count() == 0) return;
    const FieldDescriptor* f = d->field(Pick(d->field_count()));
    const google::protobuf::Reflection* r = m->GetReflection();
    if (f->is_repeated()) {
      const int n = r->FieldSize(*m, f);
      switch (Pick(5)) {
        case 0:
          r->ClearField(m, f);
          return;
        case 1:
          if (n > 0) r->RemoveLast(m, f);
          return;
        case 2:  // grow by one (or a burst, for repeated numbers)
        case 3: {
          const int add = f->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE ? 1 : 1 + Pick(64);
          for (int i = 0; i < add; ++i) {
            if (f->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE) {
              google::protobuf::Message* sub = r->AddMessage(m, f);
              if (depth < 4) Mutate(sub, depth + 1);
            } else {
              AddScalar(m, r, f);
            }
          }
          return;
        }
        default:
          if (n == 0) {
            if (f->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE) r->AddMessage(m, f);
            else AddScalar(m, r, f);
            return;
          }
          SetScalarOrRecurse(m, r, f, Pick(n), depth);
          return;
      }
    }
    if (f->cpp_type() == FieldDescriptor::CPPTYPE_MESSAGE && Pick(8) == 0) {
      r->ClearField(m, f);
      return;
    }
    SetScalarOrRecurse(m, r, f, -1, depth);
  }

 private:
  int Pick(int n) { return static_cast<int>(rng_() % static_cast<uint32_t>(n)); }

  int64_t Int(int64_t old, int64_t lo, int64_t hi) {
    // Wrapping arithmetic on the old value: the mutator itself must not overflow.
    const auto u = static_cast<uint64_t>(old);
    const int64_t choices[] = {0, 1, -1, 2, 3, 4, 7, 8, 16, 31, 32, 64, 255, 256, 1023, 1024,
                               4096, 65535, 65536, 1 << 20, lo, hi, static_cast<int64_t>(u + 1),
                               static_cast<int64_t>(u - 1), static_cast<int64_t>(u * 2),
                               old / 2, static_cast<int64_t>(rng_())};
    const int64_t v = choices[Pick(sizeof(choices) / sizeof(choices[0]))];
    return std::min(std::max(v, lo), hi);
  }

  double Real(double old) {
    const double choices[] = {0.0, -0.0, 1.0, -1.0, 0.5, 1e-30, 1e30, 3.4e38, -3.4e38,
                              std::numeric_limits<double>::quiet_NaN(),
                              std::numeric_limits<double>::infinity(),
                              -std::numeric_limits<double>::infinity(),
                              std::numeric_limits<float>::denorm_min(), old * 2, -old,
                              static_cast<double>(rng_()) / 1e6};
    return choices[Pick(sizeof(choices) / sizeof(choices[0]))];
  }

  std::string Bytes(std::string s) {
    switch (Pick(6)) {
      case 0:
        return "";
      case 1:
        s.resize(s.size() / 2);
        return s;
      case 2:
        return s + s;
      case 3:  // resize to a multiple of 2 or 4 (whole BF16 or FP32 elements)
        s.resize((1 + Pick(64)) * (Pick(2) ? 2 : 4), static_cast<char>(rng_()));
        return s;
      default: {
        const size_t max = std::max<size_t>(64, s.size() * 2);
        s.resize(max);
        const size_t n = LLVMFuzzerMutate(reinterpret_cast<uint8_t*>(s.data()),
                                          std::min(s.size(), max / 2 + 1), max);
        s.resize(n);
        return s;
      }
    }
  }

  // index -1: the singular field; otherwise element `index` of a repeated one.
  void SetScalarOrRecurse(google::protobuf::Message* m, const google::protobuf::Reflection* r,
                          const google::protobuf::FieldDescriptor* f, int index, int depth) {
    using google::protobuf::FieldDescriptor;
    const bool rep = index >= 0;
    switch (f->cpp_type()) {
      case FieldDescriptor::CPPTYPE_MESSAGE: {
        google::protobuf::Message* sub =
            rep ? r->MutableRepeatedMessage(m, f, index) : r->MutableMessage(m, f);
        if (depth < 4) Mutate(sub, depth + 1);
        return;
      }
      case FieldDescriptor::CPPTYPE_INT32: {
        const int64_t old = rep ? r->GetRepeatedInt32(*m, f, index) : r->GetInt32(*m, f);
        const auto v = static_cast<int32_t>(Int(old, INT32_MIN, INT32_MAX));
        rep ? r->SetRepeatedInt32(m, f, index, v) : r->SetInt32(m, f, v);
        return;
      }
      case FieldDescriptor::CPPTYPE_INT64: {
        const int64_t old = rep ? r->GetRepeatedInt64(*m, f, index) : r->GetInt64(*m, f);
        const int64_t v = Int(old, INT64_MIN, INT64_MAX);
        rep ? r->SetRepeatedInt64(m, f, index, v) : r->SetInt64(m, f, v);
        return;
      }
      case FieldDescriptor::CPPTYPE_UINT32: {
        const int64_t old = rep ? r->GetRepeatedUInt32(*m, f, index) : r->GetUInt32(*m, f);
        const auto v = static_cast<uint32_t>(Int(old, 0, UINT32_MAX));
        rep ? r->SetRepeatedUInt32(m, f, index, v) : r->SetUInt32(m, f, v);
        return;
      }
      case FieldDescriptor::CPPTYPE_UINT64: {
        const uint64_t old = rep ? r->GetRepeatedUInt64(*m, f, index) : r->GetUInt64(*m, f);
        const uint64_t choices[] = {0, 1, 2, 7, 64, 4096, 1ull << 32, 1ull << 63, UINT64_MAX,
                                    UINT64_MAX - 1, old + 1, old - 1, old * 2, old / 2,
                                    static_cast<uint64_t>(Int(0, 0, INT64_MAX))};
        const uint64_t v = choices[Pick(sizeof(choices) / sizeof(choices[0]))];
        rep ? r->SetRepeatedUInt64(m, f, index, v) : r->SetUInt64(m, f, v);
        return;
      }
      case FieldDescriptor::CPPTYPE_FLOAT: {
        const double old = rep ? r->GetRepeatedFloat(*m, f, index) : r->GetFloat(*m, f);
        double w = Real(old);
        if (std::isfinite(w) && std::fabs(w) > std::numeric_limits<float>::max()) {
          w = std::copysign(std::numeric_limits<double>::infinity(), w);  // no overflowing cast
        }
        const auto v = static_cast<float>(w);
        rep ? r->SetRepeatedFloat(m, f, index, v) : r->SetFloat(m, f, v);
        return;
      }
      case FieldDescriptor::CPPTYPE_DOUBLE: {
        const double old = rep ? r->GetRepeatedDouble(*m, f, index) : r->GetDouble(*m, f);
        const double v = Real(old);
        rep ? r->SetRepeatedDouble(m, f, index, v) : r->SetDouble(m, f, v);
        return;
      }
      case FieldDescriptor::CPPTYPE_BOOL: {
        const bool old = rep ? r->GetRepeatedBool(*m, f, index) : r->GetBool(*m, f);
        rep ? r->SetRepeatedBool(m, f, index, !old) : r->SetBool(m, f, !old);
        return;
      }
      case FieldDescriptor::CPPTYPE_ENUM: {
        // Open (proto3) enums take unknown numbers too.
        const int v = Pick(4) == 0 ? static_cast<int>(Int(0, -2, 100))
                                   : f->enum_type()->value(Pick(f->enum_type()->value_count()))->number();
        rep ? r->SetRepeatedEnumValue(m, f, index, v) : r->SetEnumValue(m, f, v);
        return;
      }
      case FieldDescriptor::CPPTYPE_STRING: {
        std::string old = rep ? r->GetRepeatedString(*m, f, index) : r->GetString(*m, f);
        std::string v = Bytes(std::move(old));
        if (f->type() == FieldDescriptor::TYPE_STRING) {
          for (char& ch : v) ch = static_cast<char>(0x20 + (static_cast<unsigned char>(ch) % 0x5f));
        }
        rep ? r->SetRepeatedString(m, f, index, std::move(v)) : r->SetString(m, f, std::move(v));
        return;
      }
    }
  }

  void AddScalar(google::protobuf::Message* m, const google::protobuf::Reflection* r,
                 const google::protobuf::FieldDescriptor* f) {
    using google::protobuf::FieldDescriptor;
    switch (f->cpp_type()) {
      case FieldDescriptor::CPPTYPE_INT32: r->AddInt32(m, f, 0); break;
      case FieldDescriptor::CPPTYPE_INT64: r->AddInt64(m, f, 0); break;
      case FieldDescriptor::CPPTYPE_UINT32: r->AddUInt32(m, f, 0); break;
      case FieldDescriptor::CPPTYPE_UINT64: r->AddUInt64(m, f, 0); break;
      case FieldDescriptor::CPPTYPE_FLOAT: r->AddFloat(m, f, 0); break;
      case FieldDescriptor::CPPTYPE_DOUBLE: r->AddDouble(m, f, 0); break;
      case FieldDescriptor::CPPTYPE_BOOL: r->AddBool(m, f, false); break;
      case FieldDescriptor::CPPTYPE_ENUM: r->AddEnumValue(m, f, 0); break;
      case FieldDescriptor::CPPTYPE_STRING: r->AddString(m, f, ""); break;
      case FieldDescriptor::CPPTYPE_MESSAGE: return;
    }
    SetScalarOrRecurse(m, r, f, r->FieldSize(*m, f) - 1, 0);
  }

  std::mt19937 rng_;
};

template <class Msg>
size_t MutateSerialized(uint8_t* data, size_t size, size_t max_size, unsigned seed) {
  Msg m;
  if (!m.ParseFromArray(data, static_cast<int>(size))) m.Clear();
  ProtoMutator mutator(seed);
  for (unsigned i = 0, n = 1 + seed % 3; i < n; ++i) mutator.Mutate(&m);
  const std::string out = m.SerializeAsString();
  if (out.size() > max_size) return LLVMFuzzerMutate(data, size, max_size);
  std::memcpy(data, out.data(), out.size());
  return out.size();
}

}  // namespace moe::fuzz

#define MOE_PROTO_FUZZER(Msg)                                                               \
  extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size, size_t max_size,    \
                                            unsigned int seed) {                            \
    return moe::fuzz::MutateSerialized<Msg>(data, size, max_size, seed);                   \
  }

#endif  // MOE_FUZZ_PROTO_MUTATOR_H_
