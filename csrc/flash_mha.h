// flash_mha: the only interface between the framework glue (ops.cpp) and the kernels.
// Kernels see these plain structs (raw pointers, int64 sizes and strides in elements),
// never an at::Tensor. No torch header is included here, so nvcc never parses torch.
#pragma once
#include <cstdint>

namespace flash_mha {

enum class Dtype : int { kFloat64 = 0, kFloat32 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Causal alignment. TopLeft: key j is visible to query i iff j <= i (torch SDPA's is_causal).
// BottomRight: j <= i + (n_k - n_q) (FlashAttention >= 2.1, key-value caches).
enum class Causal : int { kNone = 0, kTopLeft = 1, kBottomRight = 2 };

// A 4-d strided view broadcast to [b, h, n_q, n_k]; a broadcast dim has stride 0.
struct Strided4 {
  int64_t b = 0, h = 0, q = 0, k = 0;
};

// Which CUDA kernel family runs. kAuto: the fastest one that takes the call (sm90 on Hopper, then
// sm80, then SIMT). A forced path that does not take a call falls back down that same chain.
// Set by flash_mha.force_kernel() (benchmarks, tests); kernels never read it.
enum class CudaPath : int { kAuto = 0, kSimt = 1, kSm80 = 2, kSm90 = 3 };

struct FwdParams {
  Dtype dtype;
  CudaPath path = CudaPath::kAuto;
  const void* q;   // [b, h,    n_q, d]    last dim contiguous
  const void* k;   // [b, h_kv, n_k, d]    last dim contiguous
  const void* v;   // [b, h_kv, n_k, d_v]  last dim contiguous
  void* o;         // [b, h,    n_q, d_v]  last dim contiguous
  void* lse;       // [b, h, n_q] contiguous; float64 for kFloat64 inputs, float32 otherwise.
                   // log-sum-exp of the scaled (natural-log) scores; +inf for a row that sees no key.
  const void* bias;        // additive bias, dtype of q, or nullptr; broadcast to [b, h, n_q, n_k]
  const uint8_t* mask;     // bool (1 = attend), or nullptr; broadcast to [b, h, n_q, n_k]
  const int64_t* rng;      // [2] = {seed, offset}, on the device of q; nullptr when dropout_p == 0

  int64_t b, h, h_kv, n_q, n_k, d, d_v;
  int64_t q_sb, q_sh, q_sn;   // strides of q (b, h, n)
  int64_t k_sb, k_sh, k_sn;
  int64_t v_sb, v_sh, v_sn;
  int64_t o_sb, o_sh, o_sn;
  Strided4 bias_s, mask_s;

  double scale;               // multiplies q.k before bias is added
  Causal causal;
  double dropout_p;           // in [0, 1)
  uint32_t dropout_threshold; // an element is kept iff its 16 Philox bits >= threshold (philox.h)
};

struct BwdParams : FwdParams {
  const void* dout = nullptr;  // [b, h, n_q, d_v]   last dim contiguous
  int64_t do_sb = 0, do_sh = 0, do_sn = 0;
  void* dq = nullptr;          // [b, h, n_q, d]     contiguous, dtype of q
  void* dk = nullptr;          // [b, h_kv, n_k, d]  contiguous
  void* dv = nullptr;          // [b, h_kv, n_k, d_v] contiguous
  void* dbias = nullptr;       // shape of bias (broadcast dims kept as size 1), contiguous, dtype of q; or nullptr
  Strided4 dbias_s;            // strides of dbias, 0 on broadcast dims
  bool deterministic = false;  // torch.use_deterministic_algorithms(True)
};

// CPU kernels (csrc/cpu/attention.cpp).
void cpu_fwd(const FwdParams& p);
void cpu_bwd(const BwdParams& p);

}  // namespace flash_mha

#ifdef FLASH_MHA_WITH_CUDA
namespace flash_mha {
// CUDA kernels (csrc/cuda/). `stream` is a cudaStream_t. ops.cpp checks sm >= 80 before calling.
// The backward needs a scratch buffer of cuda_bwd_workspace_bytes(p) bytes (float32 dQ
// accumulator, rowsum(dO * O), dbias accumulator, ...), allocated by ops.cpp uninitialised:
// cuda_bwd zeroes what its kernels need.
void cuda_fwd(const FwdParams& p, void* stream);
int64_t cuda_bwd_workspace_bytes(const BwdParams& p);
void cuda_bwd(const BwdParams& p, void* workspace, void* stream);
}  // namespace flash_mha
#endif
