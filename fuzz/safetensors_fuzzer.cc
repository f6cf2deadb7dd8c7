// Feeds arbitrary bytes to the safetensors parser and, when it accepts them, reads every tensor
// and loads a checkpoint from it: nothing may crash, leak or read out of bounds.

#include <cstddef>
#include <cstdint>
#include <string>

#include "services/common/checkpoint.h"
#include "services/common/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  auto reader = moe::common::SafetensorsReader::Parse(bytes, "fuzz");
  if (!reader.ok()) return 0;
  for (const auto& t : (*reader)->tensors()) {
    if (t.dtype == moe::common::StDType::kI32) {
      (void)(*reader)->ReadInt32(t.name);
    } else if (t.num_elements <= (1 << 20)) {
      (void)(*reader)->ReadFloat(t.name);
    }
  }
  (void)moe::common::LoadCheckpoint(**reader, {});
  return 0;
}
