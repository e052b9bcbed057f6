// The CUDA entry points of flash_mha.h: float16/bfloat16/float32 shapes the tensor-core path
// supports go there (float32 as 3xTF32); everything else (float64, odd head dims or strides, dbias
// reductions across blocks in deterministic mode) runs on the SIMT kernels. On Hopper (compute
// capability 9.0) the forward and backward prefer the TMA + wgmma kernels where they apply; set
// FLASH_MHA_DISABLE_SM90=1 to keep the portable path.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace flash_mha {
namespace {

// Whether the current device is a compute capability 9.0 part, asked once per device.
bool device_is_sm90() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];  // 0: not asked yet, 1: no, 2: yes
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) {
    cudaGetLastError();
    return false;
  }
  int v = cache[dev].load(std::memory_order_relaxed);
  if (v == 0) {
    int major = 0, minor = 0;
    const bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess;
    if (!ok) cudaGetLastError();
    v = ok && major == 9 && minor == 0 ? 2 : 1;
    cache[dev].store(v, std::memory_order_relaxed);
  }
  return v == 2;
}

bool sm90_disabled() {
  static const bool off = [] {
    const char* e = std::getenv("FLASH_MHA_DISABLE_SM90");
    return e != nullptr && std::strcmp(e, "1") == 0;
  }();
  return off;
}

}  // namespace

// Auto and a forced sm90 path start at sm90, a forced sm80 path at sm80; each step falls through
// to the next family when it does not take the call (FLASH_MHA_DISABLE_SM90=1 removes sm90).
void cuda_fwd(const FwdParams& p, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  const bool try_sm90 = p.path == CudaPath::kAuto || p.path == CudaPath::kSm90;
  const bool try_sm80 = try_sm90 || p.path == CudaPath::kSm80;
  if (try_sm90 && !sm90_disabled() && device_is_sm90() && cuda::sm90_fwd_supported(p)) {
    cuda::sm90_fwd(p, s);
  } else if (try_sm80 && cuda::sm80_fwd_supported(p)) {
    cuda::sm80_fwd(p, s);
  } else {
    cuda::simt_fwd(p, s);
  }
}

// The backward follows the same chain. sm90_bwd falls back to sm80_bwd (or simt_bwd where sm80 does
// not take the call) by itself when TMA refuses a view, so its workspace is the larger of the two.
static bool bwd_uses_sm90(const BwdParams& p) {
  return (p.path == CudaPath::kAuto || p.path == CudaPath::kSm90) && !sm90_disabled() && device_is_sm90() &&
         cuda::sm90_bwd_supported(p);
}
static bool bwd_uses_sm80(const BwdParams& p) { return p.path != CudaPath::kSimt && cuda::sm80_bwd_supported(p); }

int64_t cuda_bwd_workspace_bytes(const BwdParams& p) {
  if (bwd_uses_sm90(p)) {  // and room for its own fallback (sm90_bwd_variant)
    const int64_t fallback =
        cuda::sm80_bwd_supported(p) ? cuda::sm80_bwd_workspace_bytes(p) : cuda::simt_bwd_workspace_bytes(p);
    return std::max(cuda::sm90_bwd_workspace_bytes(p), fallback);
  }
  return bwd_uses_sm80(p) ? cuda::sm80_bwd_workspace_bytes(p) : cuda::simt_bwd_workspace_bytes(p);
}

// The workspace comes uninitialised (flash_mha.h): sm90_bwd zeroes what it needs in its own
// kernels (saves a memset pass over the float32 dQ accumulator); the others get it zeroed here.
void cuda_bwd(const BwdParams& p, void* workspace, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  if (bwd_uses_sm90(p)) {
    cuda::sm90_bwd(p, workspace, s);
    return;
  }
  const int64_t bytes = cuda_bwd_workspace_bytes(p);
  if (bytes > 0) cudaMemsetAsync(workspace, 0, static_cast<size_t>(bytes), s);
  if (bwd_uses_sm80(p)) {
    cuda::sm80_bwd(p, workspace, s);
  } else {
    cuda::simt_bwd(p, workspace, s);
  }
}

}  // namespace flash_mha
