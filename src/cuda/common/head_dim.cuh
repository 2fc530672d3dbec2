// Compile-time head dims for host-side dispatch: the head dims the CUDA kernels are built for.
#pragma once

#include <type_traits>

#include "api/errors.hpp"

namespace turboattn::cuda {

// Calls f(std::integral_constant<int, D>) for a supported head dim; any other is an unsupported
// configuration, named with `kernels` ("quantization kernel", ...).
template <typename F>
void with_head_dim(int dim, const char* kernels, F&& f) {
  switch (dim) {
    case 64: return f(std::integral_constant<int, 64>{});
    case 96: return f(std::integral_constant<int, 96>{});
    case 128: return f(std::integral_constant<int, 128>{});
    case 256: return f(std::integral_constant<int, 256>{});
  }
  throw Error(TA_ERROR_UNSUPPORTED, concat("head dim ", dim, " has no ", kernels));
}

}  // namespace turboattn::cuda
