#include "services/collective/transport.h"

#include <cstring>

namespace moe::collective {

size_t Payload::size() const {
  size_t n = 0;
  for (absl::string_view p : pieces) n += p.size();
  return n;
}

char* Payload::Allocate(size_t n) {
  std::shared_ptr<char[]> buf(new char[n == 0 ? 1 : n]);
  pieces.assign(1, absl::string_view(buf.get(), n));
  owner = std::move(buf);
  return const_cast<char*>(pieces[0].data());
}

Payload Payload::Copy(absl::string_view bytes) {
  Payload p;
  char* dst = p.Allocate(bytes.size());
  if (!bytes.empty()) std::memcpy(dst, bytes.data(), bytes.size());
  return p;
}

Payload Payload::Take(std::string bytes) {
  auto owned = std::make_shared<const std::string>(std::move(bytes));
  Payload p;
  p.pieces.assign(1, absl::string_view(*owned));
  p.owner = std::move(owned);
  return p;
}

}  // namespace moe::collective
