// `turboattn reference`: the CPU reference on a sample problem (error and memory figures).
#pragma once

namespace turboattn::cli {

struct SampleOptions {
  int seqlen = 1024;
  int head_dim = 128;
};

// Returns the process exit code.
int run_reference_sample(const SampleOptions& opt);

}  // namespace turboattn::cli
