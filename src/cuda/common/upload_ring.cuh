// Small host arrays that kernels read (a cache write's runs), uploaded through pinned memory. A
// cudaMemcpyAsync from pageable memory may synchronize with its stream before staging the copy (the
// CUDA documentation allows it), so an append could wait for the GPU to finish the layers queued before
// it; from pinned memory the copy is queued and the call returns. The pinned area and its device mirror form a
// ring: a region is taken per call and comes back once an event recorded after the call's last kernel
// has completed, so the host waits only when the GPU is a whole ring behind. The ring holds
// kCallsAhead calls of the largest size seen (a model step's appends, one per layer, with room to
// spare), up to kMaxBytes; a larger call still fits twice.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <vector>

#include "cuda/common/check.cuh"

namespace turboattn::cuda {

class UploadRing {
 public:
  static constexpr size_t kInitialBytes = size_t(1) << 16;
  static constexpr size_t kMaxBytes = size_t(16) << 20;
  static constexpr size_t kCallsAhead = 64;
  static constexpr size_t kAlign = 64;

  UploadRing() = default;
  ~UploadRing() { reset(); }
  UploadRing(const UploadRing&) = delete;
  UploadRing& operator=(const UploadRing&) = delete;

  // One call's arrays (std::vectors) in one region: the constructor stages them, upload() copies them to
  // the device in one cudaMemcpyAsync, device<X>(i) gives the i-th array's copy, and release() frees the
  // region once the stream reaches that point.
  class Batch {
   public:
    template <typename... Arrays>
    explicit Batch(UploadRing& ring, const Arrays&... arrays) : ring_(ring) {
      static_assert(sizeof...(Arrays) <= kMaxArrays, "UploadRing::Batch: raise kMaxArrays");
      bytes_ = (size_t(0) + ... + aligned(arrays.size() * sizeof(typename Arrays::value_type)));
      if (bytes_ != 0) host_ = ring_.take(bytes_, region_);
      size_t offset = 0, i = 0;
      const auto stage = [&](const auto& array) {
        const size_t size = array.size() * sizeof(array[0]);
        if (size != 0) std::memcpy(host_ + offset, array.data(), size);
        offsets_[i++] = offset;
        offset += aligned(size);
      };
      (stage(arrays), ...);
    }
    Batch(const Batch&) = delete;
    Batch& operator=(const Batch&) = delete;

    void upload(cudaStream_t stream) {
      if (bytes_) TA_CUDA_CHECK(cudaMemcpyAsync(ring_.device_ + region_, host_, bytes_, cudaMemcpyHostToDevice, stream));
    }
    template <typename X>
    const X* device(size_t array) const { return reinterpret_cast<const X*>(ring_.device_ + region_ + offsets_[array]); }
    void release(cudaStream_t stream) {
      if (host_ != nullptr) ring_.give_back(region_, bytes_, stream);
      host_ = nullptr;
    }

   private:
    static constexpr size_t kMaxArrays = 4;
    UploadRing& ring_;
    size_t bytes_ = 0, region_ = 0, offsets_[kMaxArrays] = {};
    uint8_t* host_ = nullptr;
  };

  static size_t aligned(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

 private:
  struct Pending {
    size_t begin, end;
    cudaEvent_t done;
  };

  // A region of `bytes` (aligned); waits for the oldest pending regions while there is no room.
  uint8_t* take(size_t bytes, size_t& region) {
    grow(bytes);
    for (;;) {
      while (!pending_.empty() && cudaEventQuery(pending_.front().done) == cudaSuccess) retire_front();
      if (pending_.empty()) head_ = 0;
      const size_t tail = pending_.empty() ? capacity_ : pending_.front().begin;
      // Free space is [head, capacity) and [0, tail) when the ring has wrapped behind the head, else
      // [head, tail); a region never ends on the tail, so head == tail means empty.
      if (head_ >= tail || pending_.empty()) {
        if (capacity_ - head_ >= bytes) break;
        if (!pending_.empty() && tail > bytes) {
          head_ = 0;
          break;
        }
      } else if (tail - head_ > bytes) {
        break;
      }
      TA_CUDA_CHECK(cudaEventSynchronize(pending_.front().done));
      retire_front();
    }
    region = head_;
    head_ += bytes;
    return host_ + region;
  }

  void give_back(size_t region, size_t bytes, cudaStream_t stream) {
    cudaEvent_t done;
    if (idle_events_.empty()) {
      TA_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
    } else {
      done = idle_events_.back();
      idle_events_.pop_back();
    }
    pending_.push_back({region, region + bytes, done});
    TA_CUDA_CHECK(cudaEventRecord(done, stream));
  }

  void retire_front() {
    idle_events_.push_back(pending_.front().done);
    pending_.pop_front();
  }

  // Room for kCallsAhead calls of `bytes` (up to kMaxBytes) and for two at least: when the ring is
  // smaller, waits for every pending region, then reallocates.
  void grow(size_t bytes) {
    const size_t wanted = std::max(2 * bytes, std::min(kCallsAhead * bytes, kMaxBytes));
    if (capacity_ >= wanted) return;
    size_t capacity = std::max(capacity_, kInitialBytes);
    while (capacity < wanted) capacity *= 2;
    for (const Pending& p : pending_) TA_CUDA_CHECK(cudaEventSynchronize(p.done));
    while (!pending_.empty()) retire_front();
    free_memory();
    TA_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&host_), capacity, cudaHostAllocDefault));
    const cudaError_t err = cudaMalloc(reinterpret_cast<void**>(&device_), capacity);
    if (err != cudaSuccess) {
      cudaGetLastError();
      cudaFreeHost(host_);
      host_ = nullptr;
      throw Error(TA_ERROR_OUT_OF_MEMORY, concat("cache: cannot allocate ", capacity, " bytes of GPU memory for its uploads: ",
                                                 cudaGetErrorString(err)));
    }
    capacity_ = capacity, head_ = 0;
  }

  void free_memory() {
    if (host_) cudaFreeHost(host_);
    if (device_) cudaFree(device_);
    host_ = device_ = nullptr, capacity_ = 0;
  }

  void reset() {
    for (const Pending& p : pending_) cudaEventSynchronize(p.done);
    while (!pending_.empty()) retire_front();
    for (cudaEvent_t e : idle_events_) cudaEventDestroy(e);
    idle_events_.clear();
    free_memory();
  }

  uint8_t* host_ = nullptr;    // pinned
  uint8_t* device_ = nullptr;  // the same offsets on the device
  size_t capacity_ = 0, head_ = 0;
  std::deque<Pending> pending_;  // oldest first
  std::vector<cudaEvent_t> idle_events_;
};

}  // namespace turboattn::cuda
