// The turboattn command line: `turboattn <subcommand>`. `reference` and `version` run here; the
// subcommands that need PyTorch or transformers (bench, calibrate, demo, eval) are the Python package's
// (bindings/python/turboattn/cli.py), and this program hands them to `python3 -m turboattn`.
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "sample.hpp"
#include "turboattn/turboattn.h"

extern char** environ;  // POSIX; unistd.h declares it only under some feature macros

namespace {
void usage() {
  std::printf(
      "usage: turboattn <command> [options]\n"
      "\n"
      "commands:\n"
      "  reference [--seqlen N] [--head-dim D]   run the CPU reference on a sample problem and print its\n"
      "                                           error against float64 attention and the cache memory\n"
      "  version                                  print the library version and whether CUDA is usable\n"
      "  bench prefill|decode [options]           run a GPU benchmark (docs/BENCHMARKS.md): JSON and PNG results\n"
      "  calibrate MODEL_DIR --text FILE --fraction F --out PATH [--tokens N] [--metric M]\n"
      "                                           per-head 4/2-bit assignment for a local transformers model\n"
      "  demo [options]                           generate with the FP16 cache and with turboattn on a real model\n"
      "  eval [options]                           accuracy on a real model and text (docs/ACCURACY.md)\n"
      "\n"
      "bench, calibrate, demo and eval run `python3 -m turboattn` (the Python package: pip install . in the\n"
      "source tree);\n"
      "`turboattn <command> --help` lists a command's options.\n");
}

const char* const kInstallPackage =
    "install the Python package: pip install . in the turboattn source tree (or set "
    "PYTHONPATH=<source tree>/bindings/python)";

// Replaces this process with `python3 -m turboattn <argv[1:]>`; returns (with 2) only on failure.
int run_python_command(int argc, char** argv) {
  const char* cmd = argv[1];
  // Checked first because after exec, python's own "No module named turboattn" would be the only word.
  // find_spec locates the package without importing it (nor loading the library or PyTorch).
  char arg0[] = "python3", flag[] = "-c";
  char probe[] = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('turboattn') else 3)";
  char* probe_argv[] = {arg0, flag, probe, nullptr};
  pid_t pid;
  const int err = posix_spawnp(&pid, "python3", nullptr, nullptr, probe_argv, environ);
  int status = 0;
  if (err == 0 && waitpid(pid, &status, 0) < 0) status = -1;
  // Depending on the C library, a missing python3 is a spawn error or a child exiting with 127.
  if (err == ENOENT || (err == 0 && WIFEXITED(status) && WEXITSTATUS(status) == 127)) {
    std::fprintf(stderr, "turboattn %s: python3 not found on the PATH: install Python 3, then %s\n", cmd,
                 kInstallPackage);
    return 2;
  }
  if (err != 0) {
    std::fprintf(stderr, "turboattn %s: cannot run python3: %s\n", cmd, std::strerror(err));
    return 2;
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    if (WIFEXITED(status) && WEXITSTATUS(status) == 3)
      std::fprintf(stderr, "turboattn %s: python3 has no turboattn package: %s\n", cmd, kInstallPackage);
    else
      std::fprintf(stderr, "turboattn %s: python3 failed to start (status %d)\n", cmd, status);
    return 2;
  }
  char module_flag[] = "-m", module[] = "turboattn";
  std::vector<char*> args = {arg0, module_flag, module};
  args.insert(args.end(), argv + 1, argv + argc);
  args.push_back(nullptr);
  std::fflush(stdout);
  execvp("python3", args.data());
  std::fprintf(stderr, "turboattn %s: cannot run python3: %s\n", cmd, std::strerror(errno));
  return 2;
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
  if (cmd == "bench" || cmd == "calibrate" || cmd == "demo" || cmd == "eval") return run_python_command(argc, argv);
  std::fprintf(stderr, "turboattn: unknown command '%s'\n\n", cmd.c_str());
  usage();
  return 2;
}
