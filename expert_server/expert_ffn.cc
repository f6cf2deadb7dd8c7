#include "expert_server/expert_ffn.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <tuple>
#include <unordered_map>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "expert_server/activation.h"
#include "oneapi/dnnl/dnnl.hpp"
#include "services/common/failpoint.h"
#include "services/common/status_macros.h"

namespace moe::expert {
namespace {

using dnnl::memory;
using Tag = memory::format_tag;
using Dt = memory::data_type;
constexpr memory::dim kRt = DNNL_RUNTIME_DIM_VAL;

const dnnl::engine& CpuEngine() {
  static const dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

dnnl::stream& ThreadStream() {
  thread_local dnnl::stream stream(CpuEngine());
  return stream;
}

// A per-thread buffer that only grows; `slot` picks one of a few independent buffers.
float* ThreadBuffer(int slot, size_t floats) {
  struct Buf {
    float* p = nullptr;
    size_t n = 0;
    ~Buf() { std::free(p); }
  };
  thread_local Buf bufs[4];
  Buf& b = bufs[slot];
  if (b.n < floats) {
    std::free(b.p);
    const size_t bytes = (floats * sizeof(float) + 63) / 64 * 64;
    b.p = static_cast<float*>(std::aligned_alloc(64, bytes));
    b.n = floats;
  }
  return b.p;
}

void AddScratchpad(const dnnl::primitive_desc_base& pd,
                   std::unordered_map<int, memory>* args) {
  const memory::desc sd = pd.scratchpad_desc();
  const size_t bytes = sd.get_size();
  if (bytes == 0) return;
  (*args)[DNNL_ARG_SCRATCHPAD] = memory(sd, CpuEngine(), ThreadBuffer(3, bytes / 4 + 1));
}

dnnl::primitive_attr UserScratchpadAttr() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

using Eltwise = std::optional<std::pair<dnnl::algorithm, float>>;

// dst[rows, n] = src[rows, k] * W^T (+ bias) (then eltwise), W stored [n, k] row-major and
// reordered once into the layout oneDNN's best kernel for this CPU wants.
//
// Where that kernel takes the row count at run time (gemm:jit, plain weights), one primitive
// with DNNL_RUNTIME_DIM_VAL rows serves every batch. Its weights are stored [k, n] with each row
// padded (PaddedStride): at a stride of 2048 or 512 floats, a power of two, the rows it reads
// together fall into the same cache sets and evict each other. Padded to 2064 and 528, the
// expert's matmuls ran 2-4x faster at 2-16 rows and 1.1-1.2x at 32-256 (92-96 GFLOP/s against
// 80-88), as fast at 1 and 512 rows (stand-alone, AMD EPYC, AVX2, 1 thread).
//
// Where it does not (brgemm on AVX-512, which wants blocked weights and is up to 2.5x faster than
// gemm:jit at 8-32 rows because it does not repack the weights on every call), the weights are
// reordered once into the blocked layout, which is the same for every row count, and a primitive
// per distinct row count is created on first use and shared by every expert of the same shape
// (creation takes about 0.2 ms).
//
// One object per weight matrix, whatever is done after the product: Run's `post` picks the
// primitive (plain, the expert's activation fused, or a product with another [rows, n] tensor
// fused), all reading the same reordered weights. The up projection W1 served both the forward
// pass (activation fused) and training (plain) from two objects, each with its own reordered
// copy of W1 (4 MiB more per expert at d_model 512, d_ff 2048).
class WeightsMatmul {
 public:
  // What Run does to the product (after the bias).
  enum class Post {
    kNone,
    kAct,  // the eltwise given to the constructor
    kMul,  // times `mul`, a [rows, n] tensor (the gated FFN's act(W1 x) * (W3 x))
  };

  WeightsMatmul(int64_t k, int64_t n, const float* w, const float* bias, Eltwise eltwise)
      : k_(k), n_(n), eltwise_(eltwise), has_bias_(bias != nullptr) {
    const memory::desc plain_md({k, n}, Dt::f32, Tag::ab);
    // Probe the layout the fixed-shape kernel wants.
    const dnnl::matmul::primitive_desc probe =
        MakePd(kProbeRows, {{k, n}, Dt::f32, Tag::any}, Post::kNone);
    per_rows_ = probe.weights_desc() != plain_md;
    memory::desc weights_md;
    if (per_rows_) {
      weights_md = probe.weights_desc();
    } else {
      weights_md = memory::desc({k, n}, Dt::f32, memory::dims{PaddedStride(n), 1});
      runtime_[0] = MakeRuntime(weights_md, Post::kNone);
      if (eltwise_) runtime_[1] = MakeRuntime(weights_md, Post::kAct);
      // No fused product here: oneDNN 2.6's append_binary takes no src1 with a run-time
      // dimension, so Run multiplies after the plain matmul.
    }
    memory src({{k, n}, Dt::f32, Tag::ba}, CpuEngine(), const_cast<float*>(w));
    weights_ = memory(weights_md, CpuEngine());
    // The padding of padded rows is never read; zeroed so that no byte is left uninitialised.
    std::memset(weights_.get_data_handle(), 0, weights_md.get_size());
    dnnl::stream s(CpuEngine());
    dnnl::reorder(src, weights_).execute(s, src, weights_);
    s.wait();
    if (bias != nullptr) {
      bias_.assign(bias, bias + n);
      bias_mem_ = memory({{1, n}, Dt::f32, Tag::ab}, CpuEngine(), bias_.data());
    }
  }

  // dst = post(src W^T + bias); `mul` ([rows, n]) only for Post::kMul, fused into the matmul
  // where its kernel allows (the same float products either way). kAct needs the eltwise.
  void Run(const float* src, int64_t rows, float* dst, Post post = Post::kNone,
           const float* mul = nullptr) const {
    for (int64_t done = 0; done < rows; done += kMaxRows) {
      const int64_t m = std::min(kMaxRows, rows - done);
      RunChunk(src + done * k_, m, dst + done * n_, post,
               post == Post::kMul ? mul + done * n_ : nullptr);
    }
  }

 private:
  // Chunks larger than this are split (the kernel is compute-bound long before).
  static constexpr int64_t kMaxRows = 4096;
  static constexpr int64_t kProbeRows = 32;

  // n rounded up to 16 floats (a cache line), plus 16 where that is a multiple of 256 (1 KiB).
  static int64_t PaddedStride(int64_t n) {
    const int64_t ld = (n + 15) / 16 * 16;
    return ld % 256 == 0 ? ld + 16 : ld;
  }

  dnnl::matmul::primitive_desc MakePd(memory::dim rows, const memory::desc& wei, Post post) const {
    const memory::desc src({rows, k_}, Dt::f32, Tag::ab);
    const memory::desc dst({rows, n_}, Dt::f32, Tag::ab);
    const memory::desc bias_md =
        has_bias_ ? memory::desc({1, n_}, Dt::f32, Tag::ab) : memory::desc();
    dnnl::primitive_attr attr = UserScratchpadAttr();
    if (post != Post::kNone) {
      dnnl::post_ops po;
      if (post == Post::kAct) {
        po.append_eltwise(1.f, eltwise_->first, eltwise_->second, 0.f);
      } else {
        po.append_binary(dnnl::algorithm::binary_mul, dst);
      }
      attr.set_post_ops(po);
    }
    return dnnl::matmul::primitive_desc(dnnl::matmul::desc(src, wei, bias_md, dst), attr,
                                        CpuEngine());
  }

  struct Fixed {
    dnnl::matmul::primitive_desc pd;
    dnnl::matmul prim;
  };
  using Runtime = Fixed;  // the runtime-rows primitive of one Post

  // The fused product's primitive desc, or none where oneDNN has no kernel for it.
  std::optional<dnnl::matmul::primitive_desc> MulPd(memory::dim rows,
                                                    const memory::desc& wei) const {
    // Failpoint "unfused_product": as if no row count had the fused kernel, so that the tests
    // run the fallback (the plain matmul, then the product) on this path too (ExpertFfnUnfused;
    // read once per row count and shape, as the primitive is made).
    if (common::Failpoint("unfused_product")) return std::nullopt;
    try {
      return MakePd(rows, wei, Post::kMul);
    } catch (const dnnl::error& e) {
      if (e.status != dnnl_unimplemented) throw;
      return std::nullopt;
    }
  }

  Runtime MakeRuntime(const memory::desc& weights_md, Post post) const {
    Runtime r;
    r.pd = MakePd(kRt, weights_md, post);
    r.prim = dnnl::matmul(r.pd);
    return r;
  }

  // The fixed-shape primitive for `rows`, from a process-wide cache keyed by the whole shape.
  std::shared_ptr<const Fixed> FixedFor(int64_t rows, Post post) const {
    static std::mutex mu;  // std, not absl: visible to ThreadSanitizer
    static auto* cache = new std::map<std::tuple<int64_t, int64_t, int64_t, bool, int, int, float>,
                                      std::shared_ptr<const Fixed>>();
    const bool act = post == Post::kAct;
    const auto key =
        std::make_tuple(k_, n_, rows, has_bias_, static_cast<int>(post),
                        act ? static_cast<int>(eltwise_->first) : -1, act ? eltwise_->second : 0.f);
    {
      std::lock_guard<std::mutex> lock(mu);
      auto it = cache->find(key);
      if (it != cache->end()) return it->second;
    }
    const memory::desc any({k_, n_}, Dt::f32, Tag::any);
    std::optional<dnnl::matmul::primitive_desc> pd =
        post == Post::kMul ? MulPd(rows, any) : MakePd(rows, any, post);
    std::shared_ptr<Fixed> fixed;  // null: no fused product for this row count (kept as such)
    if (pd && pd->weights_desc() == weights_.get_desc()) {
      fixed = std::make_shared<Fixed>();
      fixed->pd = *pd;
      fixed->prim = dnnl::matmul(fixed->pd);
    } else if (post != Post::kMul) {
      throw dnnl::error(dnnl_unimplemented, "weights layout differs between row counts");
    }
    std::lock_guard<std::mutex> lock(mu);
    return cache->emplace(key, std::move(fixed)).first->second;
  }

  void RunChunk(const float* src, int64_t rows, float* dst, Post post, const float* mul) const {
    if (post == Post::kAct && !eltwise_) {
      throw dnnl::error(dnnl_invalid_arguments, "no activation to fuse into this matmul");
    }
    // The fused product where the kernel takes it (per row count: FixedFor keeps a null for one
    // that does not); else the plain matmul, then the product.
    const std::shared_ptr<const Fixed> fused_mul =
        post == Post::kMul && per_rows_ ? FixedFor(rows, Post::kMul) : nullptr;
    if (post == Post::kMul && fused_mul == nullptr) {
      RunChunk(src, rows, dst, Post::kNone, nullptr);
      const size_t size = static_cast<size_t>(rows * n_);
      for (size_t i = 0; i < size; ++i) dst[i] *= mul[i];
      return;
    }
    std::unordered_map<int, memory> args;
    args[DNNL_ARG_SRC] =
        memory({{rows, k_}, Dt::f32, Tag::ab}, CpuEngine(), const_cast<float*>(src));
    args[DNNL_ARG_WEIGHTS] = weights_;
    args[DNNL_ARG_DST] = memory({{rows, n_}, Dt::f32, Tag::ab}, CpuEngine(), dst);
    if (!bias_.empty()) args[DNNL_ARG_BIAS] = bias_mem_;
    if (post == Post::kMul) {
      args[DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1] =
          memory({{rows, n_}, Dt::f32, Tag::ab}, CpuEngine(), const_cast<float*>(mul));
    }
    dnnl::stream& s = ThreadStream();
    if (per_rows_) {
      const std::shared_ptr<const Fixed> fixed = fused_mul ? fused_mul : FixedFor(rows, post);
      AddScratchpad(fixed->pd, &args);
      fixed->prim.execute(s, args);
    } else {
      const Runtime& r = runtime_[static_cast<int>(post)];
      AddScratchpad(r.pd, &args);
      r.prim.execute(s, args);
    }
    s.wait();
  }

  int64_t k_, n_;
  Eltwise eltwise_;
  bool has_bias_;
  bool per_rows_ = false;
  // Where the kernel takes the row count at run time: the plain and the activation's.
  Runtime runtime_[2];
  memory weights_;
  std::vector<float> bias_;
  memory bias_mem_;
};

// C[M, N] (+)= op(A) op(B) with every dimension given at run time. op(A) = A^T reads A stored
// [K, M]; op(B) = B^T reads B stored [N, K]. Used by the backward pass.
class RuntimeGemm {
 public:
  RuntimeGemm(bool trans_a, bool trans_b, bool accumulate) : ta_(trans_a), tb_(trans_b) {
    const memory::desc a({kRt, kRt}, Dt::f32, ta_ ? Tag::ba : Tag::ab);
    const memory::desc b({kRt, kRt}, Dt::f32, tb_ ? Tag::ba : Tag::ab);
    const memory::desc c({kRt, kRt}, Dt::f32, Tag::ab);
    dnnl::primitive_attr attr = UserScratchpadAttr();
    if (accumulate) {
      dnnl::post_ops po;
      po.append_sum(1.f);
      attr.set_post_ops(po);
    }
    pd_ = dnnl::matmul::primitive_desc(dnnl::matmul::desc(a, b, c), attr, CpuEngine());
    prim_ = dnnl::matmul(pd_);
  }

  void Run(const float* a, const float* b, float* c, int64_t m, int64_t n, int64_t k) const {
    std::unordered_map<int, memory> args;
    args[DNNL_ARG_SRC] = memory({{m, k}, Dt::f32, ta_ ? Tag::ba : Tag::ab}, CpuEngine(),
                                const_cast<float*>(a));
    args[DNNL_ARG_WEIGHTS] = memory({{k, n}, Dt::f32, tb_ ? Tag::ba : Tag::ab}, CpuEngine(),
                                    const_cast<float*>(b));
    args[DNNL_ARG_DST] = memory({{m, n}, Dt::f32, Tag::ab}, CpuEngine(), c);
    AddScratchpad(pd_, &args);
    dnnl::stream& s = ThreadStream();
    prim_.execute(s, args);
    s.wait();
  }

 private:
  bool ta_, tb_;
  dnnl::matmul::primitive_desc pd_;
  dnnl::matmul prim_;
};

std::pair<dnnl::algorithm, float> EltwiseFor(common::Activation a) {
  switch (a) {
    case common::Activation::kRelu:
      return {dnnl::algorithm::eltwise_relu, 0.f};
    case common::Activation::kGelu:
      return {dnnl::algorithm::eltwise_gelu_erf, 0.f};
    case common::Activation::kSilu:
      return {dnnl::algorithm::eltwise_swish, 1.f};
  }
  return {dnnl::algorithm::eltwise_relu, 0.f};
}

const float* DataOrNull(const std::vector<float>& v) { return v.empty() ? nullptr : v.data(); }

void ColumnSum(const float* m, int64_t rows, int64_t cols, std::vector<float>* out) {
  out->assign(static_cast<size_t>(cols), 0.f);
  float* o = out->data();
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = m + r * cols;
    for (int64_t c = 0; c < cols; ++c) o[c] += row[c];
  }
}

template <typename Fn>
absl::Status Guard(const char* what, Fn&& fn) {
  try {
    fn();
  } catch (const dnnl::error& e) {
    return absl::InternalError(absl::StrCat("oneDNN ", what, " failed: ", e.what()));
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(absl::StrCat(what, ": out of memory"));
  }
  return absl::OkStatus();
}

}  // namespace

struct ExpertFfn::Impl {
  std::unique_ptr<WeightsMatmul> up;    // W1 x + b1, or act(W1 x + b1)
  std::unique_ptr<WeightsMatmul> up3;   // W3 x + b3, or (W3 x + b3) * act(W1 x + b1)
  std::unique_ptr<WeightsMatmul> down;  // W2 a + b2
  RuntimeGemm gemm_nn{false, false, false};
  RuntimeGemm gemm_nn_acc{false, false, true};
  RuntimeGemm gemm_tn{true, false, false};
};

ExpertFfn::~ExpertFfn() = default;

absl::StatusOr<std::unique_ptr<ExpertFfn>> ExpertFfn::Create(const common::ModelConfig& config,
                                                             common::ExpertWeights weights) {
  if (config.d_model <= 0 || config.d_ff <= 0) {
    return absl::InvalidArgumentError("expert dimensions must be positive");
  }
  RETURN_IF_ERROR(common::ValidateExpert(config, weights));
  auto ffn = std::unique_ptr<ExpertFfn>(new ExpertFfn());
  ffn->config_ = config;
  ffn->weights_ = std::move(weights);
  RETURN_IF_ERROR(ffn->Rebuild());
  return ffn;
}

absl::Status ExpertFfn::Rebuild() {
  return Guard("primitive creation", [this] {
    const int64_t d = config_.d_model, f = config_.d_ff;
    auto impl = std::make_unique<Impl>();
    const common::ExpertWeights& w = weights_;
    impl->up = std::make_unique<WeightsMatmul>(d, f, w.w1.data(), DataOrNull(w.b1),
                                               EltwiseFor(config_.activation));
    if (config_.gated) {
      impl->up3 = std::make_unique<WeightsMatmul>(d, f, w.w3.data(), DataOrNull(w.b3),
                                                  std::nullopt);
    }
    impl->down = std::make_unique<WeightsMatmul>(f, d, w.w2.data(), DataOrNull(w.b2),
                                                 std::nullopt);
    impl_ = std::move(impl);
  });
}

double ExpertFfn::FlopsPerRow() const {
  return 2.0 * config_.d_model * config_.d_ff * (config_.gated ? 3 : 2);
}

absl::Status ExpertFfn::Forward(const float* x, int64_t rows, float* y) const {
  if (rows < 0) return absl::InvalidArgumentError("negative row count");
  if (rows == 0) return absl::OkStatus();
  return Guard("forward", [&] {
    const size_t hidden = static_cast<size_t>(rows) * config_.d_ff;
    using Post = WeightsMatmul::Post;
    float* a = ThreadBuffer(0, hidden);
    impl_->up->Run(x, rows, a, Post::kAct);
    if (config_.gated) {
      // The product fused into W3's matmul where the kernel allows (one pass over the hidden
      // rows less).
      float* g = ThreadBuffer(1, hidden);
      impl_->up3->Run(x, rows, g, Post::kMul, a);
      a = g;
    }
    impl_->down->Run(a, rows, y);
  });
}

absl::Status ExpertFfn::ForwardTrain(const float* x, int64_t rows, float* y,
                                     ForwardCache* cache) const {
  if (rows < 0) return absl::InvalidArgumentError("negative row count");
  const size_t hidden = static_cast<size_t>(rows) * config_.d_ff;
  cache->rows = rows;
  cache->h1.resize(hidden);
  cache->a.resize(hidden);
  cache->h3.resize(config_.gated ? hidden : 0);
  if (rows == 0) return absl::OkStatus();
  return Guard("forward", [&] {
    const common::Activation act = config_.activation;
    impl_->up->Run(x, rows, cache->h1.data());
    if (config_.gated) {
      impl_->up3->Run(x, rows, cache->h3.data());
      for (size_t i = 0; i < hidden; ++i) cache->a[i] = Activate(act, cache->h1[i]) * cache->h3[i];
    } else {
      for (size_t i = 0; i < hidden; ++i) cache->a[i] = Activate(act, cache->h1[i]);
    }
    impl_->down->Run(cache->a.data(), rows, y);
  });
}

absl::Status ExpertFfn::Backward(const float* x, const float* dy, const ForwardCache& cache,
                                 float* dx, common::ExpertWeights* grads) const {
  const int64_t m = cache.rows, d = config_.d_model, f = config_.d_ff;
  const size_t hidden = static_cast<size_t>(m) * f;
  const common::ExpertWeights& w = weights_;
  grads->w1.assign(static_cast<size_t>(f * d), 0.f);
  grads->w2.assign(static_cast<size_t>(d * f), 0.f);
  grads->w3.assign(config_.gated ? static_cast<size_t>(f * d) : 0, 0.f);
  grads->b1.assign(w.b1.empty() ? 0 : f, 0.f);
  grads->b2.assign(w.b2.empty() ? 0 : d, 0.f);
  grads->b3.assign(w.b3.empty() ? 0 : f, 0.f);
  if (m == 0) return absl::OkStatus();
  return Guard("backward", [&] {
    const common::Activation act = config_.activation;
    std::vector<float> da(hidden), dh1(hidden), dh3(config_.gated ? hidden : 0);
    impl_->gemm_nn.Run(dy, w.w2.data(), da.data(), m, f, d);            // dA = dY W2
    impl_->gemm_tn.Run(dy, cache.a.data(), grads->w2.data(), d, f, m);  // dW2 = dY^T A
    if (!w.b2.empty()) ColumnSum(dy, m, d, &grads->b2);
    if (config_.gated) {
      for (size_t i = 0; i < hidden; ++i) {
        const float h1 = cache.h1[i];
        dh3[i] = da[i] * Activate(act, h1);
        dh1[i] = da[i] * cache.h3[i] * ActivateGrad(act, h1);
      }
    } else {
      for (size_t i = 0; i < hidden; ++i) dh1[i] = da[i] * ActivateGrad(act, cache.h1[i]);
    }
    impl_->gemm_tn.Run(dh1.data(), x, grads->w1.data(), f, d, m);  // dW1 = dH1^T X
    impl_->gemm_nn.Run(dh1.data(), w.w1.data(), dx, m, d, f);      // dX = dH1 W1
    if (!w.b1.empty()) ColumnSum(dh1.data(), m, f, &grads->b1);
    if (config_.gated) {
      impl_->gemm_tn.Run(dh3.data(), x, grads->w3.data(), f, d, m);  // dW3 = dH3^T X
      impl_->gemm_nn_acc.Run(dh3.data(), w.w3.data(), dx, m, d, f);  // dX += dH3 W3
      if (!w.b3.empty()) ColumnSum(dh3.data(), m, f, &grads->b3);
    }
  });
}

absl::Status ExpertFfn::ApplySgd(const common::ExpertWeights& g, float lr) {
  auto check = [](const std::vector<float>& p, const std::vector<float>& grad, const char* name) {
    if (grad.size() != p.size()) {
      return absl::InvalidArgumentError(absl::StrCat("gradient for ", name, " has ", grad.size(),
                                                     " values, expected ", p.size()));
    }
    return absl::OkStatus();
  };
  const auto w = weights_.Tensors();
  const auto q = g.Tensors();
  for (size_t t = 0; t < w.size(); ++t)
    RETURN_IF_ERROR(check(*w[t].second, *q[t].second, w[t].first));
  for (size_t t = 0; t < w.size(); ++t) {
    std::vector<float>& p = *w[t].second;
    for (size_t i = 0; i < p.size(); ++i) p[i] = SgdStep(p[i], lr, (*q[t].second)[i]);
  }
  return Rebuild();
}

}  // namespace moe::expert
