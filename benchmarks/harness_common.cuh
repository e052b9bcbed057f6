// Helpers shared by the standalone Hopper harnesses (sm90_harness.cu, sm90_bwd_harness.cu):
// CUDA error checks, a deadline on device work (a pipeline deadlock costs seconds, not the whole
// device call), hashed random fills (never zeros) and NaN poisoning of outputs.
#pragma once
#include <cuda_runtime.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <thread>

#include "../csrc/cuda/common.cuh"

#define CK(x)                                                                                                 \
  do {                                                                                                        \
    cudaError_t e_ = (x);                                                                                     \
    if (e_ != cudaSuccess) {                                                                                  \
      std::fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorString(e_), __FILE__, __LINE__, #x); \
      std::exit(1);                                                                                           \
    }                                                                                                         \
  } while (0)

// Waits for the default stream with a 20 s deadline: a hang (an mbarrier that never completes,
// setmaxnreg over-asked) exits with code 3 instead of eating the device call.
inline void wait_or_die(const char* what) {
  const auto t0 = std::chrono::steady_clock::now();
  for (;;) {
    const cudaError_t e = cudaStreamQuery(0);
    if (e == cudaSuccess) return;
    if (e != cudaErrorNotReady) {
      std::printf("CUDA error %s during %s\n", cudaGetErrorString(e), what);
      std::fflush(stdout);
      std::exit(1);
    }
    if (std::chrono::steady_clock::now() - t0 > std::chrono::seconds(20)) {
      std::printf("HANG: %s did not finish in 20 s\n", what);
      std::fflush(stdout);
      std::_Exit(3);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

// x[i] = amp * u, u uniform in [-1, 1) from a hash of (i, seed).
template <typename T>
__global__ void fill_kernel(T* x, int64_t n, uint32_t seed, float amp) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 16; h *= 0x7feb352du; h ^= h >> 15; h *= 0x846ca68bu; h ^= h >> 16;
    const float u = (h >> 8) * (1.f / 16777216.f) * 2.f - 1.f;  // [-1, 1)
    x[i] = flash_mha::cuda::from_acc<T>(u * amp);
  }
}

// Every element NaN (so unwritten outputs show).
template <typename T>
__global__ void poison_kernel(T* x, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    x[i] = flash_mha::cuda::from_acc<T>(__int_as_float(0x7fc00000));
}
