// Helpers of the GPU tests: device buffers, the device check, and inputs stored in a given dtype and
// layout.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "reference/half.hpp"
#include "turboattn/turboattn.h"

namespace turboattn::test {

inline bool have_gpu() { return ta_cuda_available() == 1; }

// The GPU tests' fixture: skipped without a CUDA device; `rng` seeded afresh on every run, the seed in
// the trace of every failure so that a failing run can be repeated.
class GpuTest : public testing::Test {
 protected:
  void SetUp() override {
    if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
    const uint64_t seed = std::random_device{}();
    rng.seed(seed);
    seed_trace_.emplace(__FILE__, __LINE__, "seed " + std::to_string(seed));
  }
  std::mt19937_64 rng;

 private:
  std::optional<testing::ScopedTrace> seed_trace_;
};

template <class Param>
class GpuTestWithParam : public GpuTest, public testing::WithParamInterface<Param> {};

// A stream of its own (non-blocking), destroyed with the object. Failing to create one ends the test (an
// exception), rather than letting it run on the legacy default stream.
struct Stream {
  cudaStream_t s = nullptr;
  Stream() {
    const cudaError_t err = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
    if (err != cudaSuccess) throw std::runtime_error(std::string("cudaStreamCreateWithFlags: ") + cudaGetErrorString(err));
  }
  ~Stream() { cudaStreamDestroy(s); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  operator cudaStream_t() const { return s; }
};

// The work `record` queues on `stream`, captured into a CUDA graph (the capture ended even when `record`
// throws, so that the stream stays usable) and instantiated unless it threw; destroyed with the object.
class CapturedGraph {
 public:
  template <class Record>
  CapturedGraph(cudaStream_t stream, Record&& record) {
    EXPECT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
    try {
      record();
    } catch (const std::exception& e) {
      error_ = e.what();
    }
    EXPECT_EQ(cudaStreamEndCapture(stream, &graph_), cudaSuccess);
    if (graph_ && error_.empty()) {
      EXPECT_EQ(cudaGraphInstantiate(&exec_, graph_, 0), cudaSuccess);
    }
  }
  ~CapturedGraph() {
    if (exec_) cudaGraphExecDestroy(exec_);
    if (graph_) cudaGraphDestroy(graph_);
  }
  CapturedGraph(const CapturedGraph&) = delete;
  CapturedGraph& operator=(const CapturedGraph&) = delete;
  const std::string& error() const { return error_; }  // what `record` threw; empty if nothing
  bool ready() const { return exec_ != nullptr; }
  cudaError_t launch(cudaStream_t stream) const { return exec_ ? cudaGraphLaunch(exec_, stream) : cudaErrorInvalidValue; }

 private:
  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
  std::string error_;
};

// count elements of T in device memory, freed on destruction.
template <class T>
struct DeviceBuffer {
  T* ptr = nullptr;
  size_t n = 0;
  explicit DeviceBuffer(size_t count) : n(count) { EXPECT_EQ(cudaMalloc(&ptr, std::max<size_t>(1, n) * sizeof(T)), cudaSuccess); }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  void upload(const std::vector<T>& h) { EXPECT_EQ(cudaMemcpy(ptr, h.data(), n * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess); }
  std::vector<T> download() const {
    std::vector<T> h(n);
    EXPECT_EQ(cudaMemcpy(h.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return h;
  }
  void poison() { EXPECT_EQ(cudaMemset(ptr, 0xFF, n * sizeof(T)), cudaSuccess); }  // NaN for floats
};

// Sets an environment variable for a scope (the library reads TURBOATTN_PREFILL_MMA at each call).
struct ScopedEnv {
  std::string name, old;
  bool had;
  ScopedEnv(const char* n, const char* value) : name(n), had(std::getenv(n) != nullptr) {
    if (had) old = std::getenv(n);
    setenv(n, value, 1);
  }
  ~ScopedEnv() { had ? setenv(name.c_str(), old.c_str(), 1) : unsetenv(name.c_str()); }
};

// Values of x ([B, N, H, D] order) as fp16 or bf16 bits in [B, N, H, D] or [B, H, N, D] memory.
inline std::vector<uint16_t> store_as(const std::vector<float>& x, int B, int N, int H, int D, ta_dtype dtype, bool head_major) {
  std::vector<uint16_t> out(x.size());
  for (int b = 0; b < B; ++b)
    for (int n = 0; n < N; ++n)
      for (int h = 0; h < H; ++h)
        for (int d = 0; d < D; ++d) {
          const size_t src = ((size_t(b) * N + n) * H + h) * D + d;
          const size_t dst = head_major ? ((size_t(b) * H + h) * N + n) * D + d : src;
          out[dst] = dtype == TA_DTYPE_F16 ? ref::float_to_half(x[src]) : ref::float_to_bf16(x[src]);
        }
  return out;
}

}  // namespace turboattn::test
