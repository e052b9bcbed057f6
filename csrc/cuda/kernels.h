// Launchers of the flash_mha CUDA kernels, called by dispatch.cu (no torch headers anywhere here).
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "../flash_mha.h"

namespace flash_mha::cuda {

// SIMT path (simt_attention.cu): every dtype, every head dim in [1, 256], every feature.
// The backward is deterministic (no atomics). Workspace: D and a dbias accumulator.
void simt_fwd(const FwdParams& p, cudaStream_t stream);
int64_t simt_bwd_workspace_bytes(const BwdParams& p);
void simt_bwd(const BwdParams& p, void* workspace, cudaStream_t stream);

// Tensor-core path for float16 / bfloat16 and float32 (3xTF32) (sm80_fwd.cu, sm80_bwd.cu).
// *_supported says whether the shape, strides, alignment and (float32) the device's shared memory
// fit; if not, the SIMT path runs instead.
bool sm80_fwd_supported(const FwdParams& p);
void sm80_fwd(const FwdParams& p, cudaStream_t stream);
bool sm80_bwd_supported(const BwdParams& p);
int64_t sm80_bwd_workspace_bytes(const BwdParams& p);
void sm80_bwd(const BwdParams& p, void* workspace, cudaStream_t stream);

// Hopper forward (sm90_fwd.cu; TMA + wgmma, sm_90a only) for float16 / bfloat16, d == d_v in
// {64, 128}, no bias / dropout, no mask or a key mask (constant along the queries: key padding),
// TMA-describable strides. dispatch.cu calls it only on a
// compute capability 9.0 device; anything it does not take runs on the sm80 path.
bool sm90_fwd_supported(const FwdParams& p);
void sm90_fwd(const FwdParams& p, cudaStream_t stream);

// Hopper backward (sm90_bwd.cu; TMA + wgmma, sm_90a only), dispatched like the forward. Scope:
// float16 / bfloat16, d == d_v in {64, 128}, bias and its gradient, any mask, dropout (the general
// kernel), deterministic mode (dQ added in key-block order; a shared dbias stored whole and summed),
// any causal mode, GQA, any n_q / n_k, TMA-describable strides. The workspace
// (sm90_bwd_workspace_bytes, or the fallback's if larger: sm90_bwd falls back to sm80_bwd, or
// simt_bwd where sm80 does not take the call, when TMA refuses a view) may hold anything: sm90_bwd zeroes what it needs (its prep kernel the
// float32 dQ accumulator). sm80_bwd and simt_bwd need theirs zeroed.
bool sm90_bwd_supported(const BwdParams& p);
int64_t sm90_bwd_workspace_bytes(const BwdParams& p);
void sm90_bwd(const BwdParams& p, void* workspace, cudaStream_t stream);
// For benchmarks/sm90_bwd_harness.cu and experiments only: sm90_bwd with the main kernel chosen
// here instead of by use_persistent (sm90_bwd.cu). persistent_ctas == 0: one block per work item;
// > 0: the persistent kernel on min(persistent_ctas, #SMs, #work items) blocks.
void sm90_bwd_variant(const BwdParams& p, void* workspace, cudaStream_t stream, int persistent_ctas);

// Sets the dynamic shared-memory limit of `kernel` when it needs more than the default 48 KiB.
template <typename Kernel>
inline void allow_smem(Kernel kernel, int64_t bytes) {
  if (bytes > 48 * 1024) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  }
}

// An attribute of the current device (0 when it cannot be asked).
inline int64_t device_attribute(cudaDeviceAttr attr) {
  int dev = 0, value = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&value, attr, dev) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return value;
}

// FLASH_MHA_SMEM_LIMIT=<bytes> (tests): the kernels pick their tiles as on a card whose blocks may opt
// in to at most that much shared memory and whose SMs have 1 KiB more (166912: an A100), so that the
// choices made for smaller cards run on an H100 too. Read once per process.
inline int64_t smem_limit() {
  static const int64_t limit = [] {
    const char* e = std::getenv("FLASH_MHA_SMEM_LIMIT");
    return e != nullptr ? std::max<int64_t>(std::atoll(e), 0) : int64_t{0};
  }();
  return limit;
}

// Shared memory per block with opt-in, and per SM, of the current device (0 when unknown).
inline int64_t max_smem_per_block() {
  const int64_t v = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  return smem_limit() > 0 ? std::min(v, smem_limit()) : v;
}
inline int64_t max_smem_per_sm() {
  const int64_t v = device_attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor);
  return smem_limit() > 0 ? std::min(v, smem_limit() + 1024) : v;
}

}  // namespace flash_mha::cuda
