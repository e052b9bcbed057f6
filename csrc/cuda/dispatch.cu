// The CUDA entry points of flash_mha.h: float16/bfloat16 shapes the tensor-core path supports go
// there; everything else (float32, float64, odd head dims or strides, dbias reductions across
// blocks, deterministic mode for the backward) runs on the SIMT kernels.
#include "kernels.h"

namespace flash_mha {

void cuda_fwd(const FwdParams& p, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  if (cuda::sm80_fwd_supported(p)) {
    cuda::sm80_fwd(p, s);
  } else {
    cuda::simt_fwd(p, s);
  }
}

int64_t cuda_bwd_workspace_bytes(const BwdParams& p) {
  return cuda::sm80_bwd_supported(p) ? cuda::sm80_bwd_workspace_bytes(p) : cuda::simt_bwd_workspace_bytes(p);
}

void cuda_bwd(const BwdParams& p, void* workspace, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  if (cuda::sm80_bwd_supported(p)) {
    cuda::sm80_bwd(p, workspace, s);
  } else {
    cuda::simt_bwd(p, workspace, s);
  }
}

}  // namespace flash_mha
