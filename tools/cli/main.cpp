// The turboattn command line: `turboattn <subcommand>`.
#include <cstdio>
#include <cstring>
#include <string>

#include "sample.hpp"
#include "turboattn/turboattn.h"

namespace {
void usage() {
  std::printf(
      "usage: turboattn <command> [options]\n"
      "\n"
      "commands:\n"
      "  reference [--seqlen N] [--head-dim D]   run the CPU reference on a sample problem and print its\n"
      "                                           error against float64 attention and the cache memory\n"
      "  version                                  print the library version and whether CUDA is usable\n");
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "-h") || !std::strcmp(argv[1], "--help")) {
    usage();
    return argc < 2 ? 2 : 0;
  }
  const std::string cmd = argv[1];
  if (cmd == "version") {
    std::printf("turboattn %s, CUDA kernels %s\n", ta_version(), ta_cuda_available() ? "available" : "not available");
    return 0;
  }
  if (cmd == "reference") {
    turboattn::cli::SampleOptions opt;
    for (int i = 2; i < argc; ++i) {
      const std::string a = argv[i];
      if ((a == "--seqlen" || a == "--head-dim") && i + 1 < argc) {
        const int v = std::atoi(argv[++i]);
        (a == "--seqlen" ? opt.seqlen : opt.head_dim) = v;
      } else {
        std::fprintf(stderr, "turboattn reference: unknown option '%s'\n", a.c_str());
        return 2;
      }
    }
    return turboattn::cli::run_reference_sample(opt);
  }
  std::fprintf(stderr, "turboattn: unknown command '%s'\n\n", cmd.c_str());
  usage();
  return 2;
}
