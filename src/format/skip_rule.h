// The tile skip rule's threshold (docs/FORMATS.md, 1.5 step 3), shared by the CPU reference and the
// kernels so that both skip exactly the same tiles.
#pragma once

#include <stdint.h>

#include "format/cache_layout.h"  // TA_HOST_DEVICE
#include "turboattn/format.h"

namespace turboattn {

// A tile is skipped when its maximum is below the running maximum by more than this. The margin grows
// with ceil(log2(keys)), the row's key count, so that all the keys a row can skip together weigh at
// most keys * 2^(TA_SAS_SKIP_X - ceil(log2(keys))) <= 2^TA_SAS_SKIP_X of its largest key: less than half
// a P code, whatever the context length.
TA_HOST_DEVICE float skip_threshold(int64_t keys) {
  int log2_keys = 0;
  while (log2_keys < 62 && (int64_t(1) << log2_keys) < keys) ++log2_keys;
  return TA_SAS_SKIP_X - float(log2_keys);
}

}  // namespace turboattn
