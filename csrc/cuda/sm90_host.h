// Host-side helpers shared by the Hopper kernels (sm90_fwd.cu, sm90_bwd.cu): the driver's tensor-map
// encoder (looked up once through the runtime, so nothing links libcuda), rank-4 tensor maps of
// [b, h, n, d] views, and the multiprocessor count. No device code here.
#pragma once
#include <cuda.h>          // CUtensorMap and its enums (types only)
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "../flash_mha.h"

namespace flash_mha::cuda {

inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

inline PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      f = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// A rank-4 map (d, n, h, b) of a [b, h, n, d] view with the given strides (elements), boxes of
// [box_rows, 64] elements with the 128-byte swizzle. Rows past n read as zeros.
inline bool make_map(CUtensorMap* map, Dtype dt, const void* ptr, int64_t b, int64_t h, int64_t n, int64_t d,
                     int64_t sb, int64_t sh, int64_t sn, int box_rows) {
  const auto encode = encode_tiled();
  if (!encode) return false;
  constexpr int64_t kElem = 2;
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(d), static_cast<cuuint64_t>(n), static_cast<cuuint64_t>(h),
                              static_cast<cuuint64_t>(b)};
  // A dim of size 1 is never stepped along: give it a harmless (16-byte multiple) stride.
  auto st = [&](int64_t size, int64_t s) { return static_cast<cuuint64_t>(size == 1 ? 16 : s * kElem); };
  const cuuint64_t strides[3] = {st(n, sn), st(h, sh), st(b, sb)};
  const cuuint32_t box[4] = {64, static_cast<cuuint32_t>(box_rows), 1, 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const auto type = dt == Dtype::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  return encode(map, type, 4, const_cast<void*>(ptr), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// Multiprocessors of the current device (asked once per device).
inline int sm_count() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];  // 0: not asked yet
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) {
    cudaGetLastError();
    return 132;
  }
  int n = cache[dev].load(std::memory_order_relaxed);
  if (n == 0) {
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) {
      cudaGetLastError();
      n = 132;
    }
    cache[dev].store(n, std::memory_order_relaxed);
  }
  return n;
}

// Whether this binary holds the sm_90a body of `kernel`: an sm_80-only build, JIT-compiled for a
// Hopper card, would hold an empty stub, while the real body declares static shared memory.
template <typename Kernel>
bool has_sm90a_body(Kernel kernel) {
  cudaFuncAttributes attr{};
  const bool got = cudaFuncGetAttributes(&attr, kernel) == cudaSuccess;
  if (!got) cudaGetLastError();
  return got && attr.sharedSizeBytes > 0;
}

}  // namespace flash_mha::cuda
