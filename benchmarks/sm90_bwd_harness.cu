// Standalone check + timing of the Hopper backward (csrc/cuda/sm90_bwd.cu) without torch.
//
//   mkdir -p .bin && nvcc -O3 -std=c++17 --expt-relaxed-constexpr -DFLASH_MHA_WITH_CUDA -Icsrc \
//        -gencode arch=compute_90a,code=sm_90a -lineinfo -Xptxas -v -o .bin/sm90_bwd_harness \
//        benchmarks/sm90_bwd_harness.cu csrc/cuda/sm90_bwd.cu csrc/cuda/sm80_bwd.cu csrc/cuda/simt_attention.cu
//   ./.bin/sm90_bwd_harness small   # the five small cases first (a hang costs 20 s, not minutes)
//   ./.bin/sm90_bwd_harness check   # every correctness case (`check 4`: case 4 only)
//   ./.bin/sm90_bwd_harness time    # the standard grid: sm90 vs sm80 vs sm90 persistent, TFLOP/s
//   ./.bin/sm90_bwd_harness         # check, then time
//
// Inputs: random bf16 / fp16 q, k, v, dO from a hash (never zeros). A naive fp32 reference
// forward (one thread per query row) gives O (rounded to the input dtype, as the real forward
// stores it) and lse; sm90_bwd runs on those. The naive fp32 reference backward: dQ one thread per
// query row, dK / dV one thread per key row (walking the query heads of its GQA group).
// dq / dk / dv are poisoned with NaN before each checked run and scanned for NaN (unwritten
// elements); rel-L2 error per tensor against the reference. The sm80 backward runs on the same
// inputs as a yardstick for the error level. Every case also runs the persistent sm90 kernel
// (sm90_bwd_variant) on one block per SM ("sm90p") and on 2 blocks ("sm90p2": every block walks
// many work items, whatever the card), under the same tolerances. Timing: CUDA events, median of
// interleaved runs (sm90, sm80, sm90p), each including the workspace memset (ops.cpp zeroes it too);
// TFLOP/s = 2.5 x 4 b h n_q n_k d (halved for causal) / time.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "../csrc/cuda/common.cuh"
#include "../csrc/cuda/kernels.h"
#include "harness_common.cuh"

using namespace flash_mha;
using namespace flash_mha::cuda;

template <typename T>
__global__ void to_float_kernel(float* dst, const T* src, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    dst[i] = to_acc<float>(src[i]);
}

// Row pointers of the [b, h, n, d] views (strides from the params).
template <typename T>
__device__ const T* rowp(const void* base, int64_t sb, int64_t sh, int64_t sn, int64_t bi, int64_t hi, int64_t i) {
  return static_cast<const T*>(base) + bi * sb + hi * sh + i * sn;
}

__device__ bool visible(const FwdParams& p, int64_t i, int64_t j) {
  const int64_t shift = p.causal == Causal::kBottomRight ? p.n_k - p.n_q : 0;
  return p.causal == Causal::kNone || j <= i + shift;
}

// Reference forward, one thread per query row (all rows): o (dtype T, strided like p.o), lse.
template <typename T>
__global__ void ref_fwd_kernel(FwdParams p) {
  const int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (r >= p.b * p.h * p.n_q) return;
  const int64_t i = r % p.n_q, bh = r / p.n_q, hi = bh % p.h, bi = bh / p.h, kvh = hi / (p.h / p.h_kv);
  const T* q = rowp<T>(p.q, p.q_sb, p.q_sh, p.q_sn, bi, hi, i);
  float qf[128], acc[128];
  for (int c = 0; c < p.d; ++c) qf[c] = to_acc<float>(q[c]);
  for (int c = 0; c < p.d_v; ++c) acc[c] = 0.f;
  float m = -INFINITY, l = 0.f;
  for (int64_t j = 0; j < p.n_k; ++j) {
    if (!visible(p, i, j)) continue;
    const T* k = rowp<T>(p.k, p.k_sb, p.k_sh, p.k_sn, bi, kvh, j);
    const T* v = rowp<T>(p.v, p.v_sb, p.v_sh, p.v_sn, bi, kvh, j);
    float s = 0.f;
    for (int c = 0; c < p.d; ++c) s += qf[c] * to_acc<float>(k[c]);
    s *= static_cast<float>(p.scale);
    const float mn = fmaxf(m, s), a = expf(m - mn), e = expf(s - mn);
    l = l * a + e;
    for (int c = 0; c < p.d_v; ++c) acc[c] = acc[c] * a + e * to_acc<float>(v[c]);
    m = mn;
  }
  T* o = static_cast<T*>(p.o) + bi * p.o_sb + hi * p.o_sh + i * p.o_sn;
  for (int c = 0; c < p.d_v; ++c) o[c] = from_acc<T>(l > 0.f ? acc[c] / l : 0.f);
  static_cast<float*>(p.lse)[r] = l > 0.f ? m + logf(l) : INFINITY;
}

// D = rowsum(dO * O) in float, [b, h, n_q].
template <typename T>
__global__ void ref_dsum_kernel(BwdParams p, float* dsum) {
  const int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (r >= p.b * p.h * p.n_q) return;
  const int64_t i = r % p.n_q, bh = r / p.n_q, hi = bh % p.h, bi = bh / p.h;
  const T* o = rowp<T>(p.o, p.o_sb, p.o_sh, p.o_sn, bi, hi, i);
  const T* dout = rowp<T>(p.dout, p.do_sb, p.do_sh, p.do_sn, bi, hi, i);
  float acc = 0.f;
  for (int c = 0; c < p.d_v; ++c) acc += to_acc<float>(o[c]) * to_acc<float>(dout[c]);
  dsum[r] = acc;
}

// P_ij and dP_ij of one (query row, key row).
template <typename T>
__device__ void p_dp(const BwdParams& p, int64_t bi, int64_t hi, int64_t kvh, int64_t i, int64_t j, float lse,
                     float& P, float& dP) {
  const T* q = rowp<T>(p.q, p.q_sb, p.q_sh, p.q_sn, bi, hi, i);
  const T* k = rowp<T>(p.k, p.k_sb, p.k_sh, p.k_sn, bi, kvh, j);
  const T* v = rowp<T>(p.v, p.v_sb, p.v_sh, p.v_sn, bi, kvh, j);
  const T* dout = rowp<T>(p.dout, p.do_sb, p.do_sh, p.do_sn, bi, hi, i);
  float s = 0.f, dp = 0.f;
  for (int c = 0; c < p.d; ++c) s += to_acc<float>(q[c]) * to_acc<float>(k[c]);
  for (int c = 0; c < p.d_v; ++c) dp += to_acc<float>(dout[c]) * to_acc<float>(v[c]);
  P = expf(s * static_cast<float>(p.scale) - lse);  // lse = +inf -> 0
  dP = dp;
}

// dQ_i = scale sum_j P_ij (dP_ij - D_i) k_j, one thread per query row; dq [b, h, n_q, d] float.
template <typename T>
__global__ void ref_dq_kernel(BwdParams p, const float* dsum, float* dq) {
  const int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (r >= p.b * p.h * p.n_q) return;
  const int64_t i = r % p.n_q, bh = r / p.n_q, hi = bh % p.h, bi = bh / p.h, kvh = hi / (p.h / p.h_kv);
  const float lse = static_cast<const float*>(p.lse)[r];
  float acc[128];
  for (int c = 0; c < p.d; ++c) acc[c] = 0.f;
  for (int64_t j = 0; j < p.n_k; ++j) {
    if (!visible(p, i, j)) continue;
    float P, dP;
    p_dp<T>(p, bi, hi, kvh, i, j, lse, P, dP);
    const float ds = P * (dP - dsum[r]);
    const T* k = rowp<T>(p.k, p.k_sb, p.k_sh, p.k_sn, bi, kvh, j);
    for (int c = 0; c < p.d; ++c) acc[c] += ds * to_acc<float>(k[c]);
  }
  for (int c = 0; c < p.d; ++c) dq[r * p.d + c] = acc[c] * static_cast<float>(p.scale);
}

// dK_j = scale sum_{h in group, i} dS_ij q_i, dV_j = sum P_ij dO_i; one thread per key row.
template <typename T>
__global__ void ref_dkv_kernel(BwdParams p, const float* dsum, float* dk, float* dv) {
  const int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (r >= p.b * p.h_kv * p.n_k) return;
  const int64_t j = r % p.n_k, bkv = r / p.n_k, kvh = bkv % p.h_kv, bi = bkv / p.h_kv;
  const int64_t group = p.h / p.h_kv;
  float ak[128], av[128];
  for (int c = 0; c < p.d; ++c) ak[c] = 0.f;
  for (int c = 0; c < p.d_v; ++c) av[c] = 0.f;
  for (int64_t g = 0; g < group; ++g) {
    const int64_t hi = kvh * group + g;
    for (int64_t i = 0; i < p.n_q; ++i) {
      if (!visible(p, i, j)) continue;
      const int64_t row = (bi * p.h + hi) * p.n_q + i;
      float P, dP;
      p_dp<T>(p, bi, hi, kvh, i, j, static_cast<const float*>(p.lse)[row], P, dP);
      const float ds = P * (dP - dsum[row]);
      const T* q = rowp<T>(p.q, p.q_sb, p.q_sh, p.q_sn, bi, hi, i);
      const T* dout = rowp<T>(p.dout, p.do_sb, p.do_sh, p.do_sn, bi, hi, i);
      for (int c = 0; c < p.d; ++c) ak[c] += ds * to_acc<float>(q[c]);
      for (int c = 0; c < p.d_v; ++c) av[c] += P * to_acc<float>(dout[c]);
    }
  }
  for (int c = 0; c < p.d; ++c) dk[r * p.d + c] = ak[c] * static_cast<float>(p.scale);
  for (int c = 0; c < p.d_v; ++c) dv[r * p.d_v + c] = av[c];
}

struct Case {
  const char* name;
  bool bf16;
  int64_t b, h, h_kv, n_q, n_k, d;
  Causal causal;
  bool bnhd;  // q / k / v / o / dout as [b, n, h, d] views (strided heads) instead of [b, h, n, d]
};

struct Buffers {
  void *q = nullptr, *k = nullptr, *v = nullptr, *o = nullptr, *dout = nullptr;
  void *dq = nullptr, *dk = nullptr, *dv = nullptr;
  float* lse = nullptr;
  void* ws = nullptr;
  int64_t ws_bytes = 0;
};

BwdParams make_params(const Case& c, const Buffers& bu) {
  BwdParams p{};
  p.dtype = c.bf16 ? Dtype::kBFloat16 : Dtype::kFloat16;
  p.path = CudaPath::kAuto;
  p.q = bu.q; p.k = bu.k; p.v = bu.v; p.o = bu.o; p.lse = bu.lse;
  p.bias = nullptr; p.mask = nullptr; p.rng = nullptr;
  p.b = c.b; p.h = c.h; p.h_kv = c.h_kv; p.n_q = c.n_q; p.n_k = c.n_k; p.d = c.d; p.d_v = c.d;
  auto strides = [&](int64_t h, int64_t n, int64_t& sb, int64_t& sh, int64_t& sn) {
    if (c.bnhd) { sb = n * h * c.d; sn = h * c.d; sh = c.d; }
    else { sb = h * n * c.d; sh = n * c.d; sn = c.d; }
  };
  strides(c.h, c.n_q, p.q_sb, p.q_sh, p.q_sn);
  strides(c.h_kv, c.n_k, p.k_sb, p.k_sh, p.k_sn);
  strides(c.h_kv, c.n_k, p.v_sb, p.v_sh, p.v_sn);
  strides(c.h, c.n_q, p.o_sb, p.o_sh, p.o_sn);
  strides(c.h, c.n_q, p.do_sb, p.do_sh, p.do_sn);
  p.dout = bu.dout;
  p.dq = bu.dq; p.dk = bu.dk; p.dv = bu.dv;  // contiguous [b, h(_kv), n, d]
  p.dbias = nullptr;
  p.deterministic = false;
  p.scale = 1.0 / std::sqrt(static_cast<double>(c.d));
  p.causal = c.causal;
  p.dropout_p = 0.0;
  p.dropout_threshold = 0;
  return p;
}

template <typename T>
void fill(void* x, int64_t n, uint32_t seed, float amp) {
  fill_kernel<<<1024, 256>>>(static_cast<T*>(x), n, seed, amp);
}

__global__ void fill_const(float* x, int64_t n, float v) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) x[i] = v;
}

// Allocates and fills q, k, v, dout; with_ref: the reference forward gives o and lse, else (timing
// only: the naive forward at n = 16k would take minutes) o is random and lse a constant.
Buffers alloc(const Case& c, uint32_t seed, bool with_ref = true) {
  Buffers bu;
  const int64_t nq = c.b * c.h * c.n_q * c.d, nk = c.b * c.h_kv * c.n_k * c.d;
  CK(cudaMalloc(&bu.q, nq * 2)); CK(cudaMalloc(&bu.k, nk * 2)); CK(cudaMalloc(&bu.v, nk * 2));
  CK(cudaMalloc(&bu.o, nq * 2)); CK(cudaMalloc(&bu.dout, nq * 2));
  CK(cudaMalloc(&bu.dq, nq * 2)); CK(cudaMalloc(&bu.dk, nk * 2)); CK(cudaMalloc(&bu.dv, nk * 2));
  CK(cudaMalloc(&bu.lse, std::max<int64_t>(c.b * c.h * c.n_q, 1) * 4));
  // q . k * scale has std ~ 2.5 (peaked but not one-hot softmax rows), as sm90_harness.cu.
  auto fill_all = [&](auto tag) {
    using T = decltype(tag);
    fill<T>(bu.q, nq, seed * 5 + 1, 2.5f * 1.732f);
    fill<T>(bu.k, nk, seed * 5 + 2, 1.732f);
    fill<T>(bu.v, nk, seed * 5 + 3, 1.f);
    fill<T>(bu.dout, nq, seed * 5 + 4, 1.f);
    if (!with_ref) fill<T>(bu.o, nq, seed * 5 + 5, 0.1f);
  };
  if (c.bf16) fill_all(__nv_bfloat16{}); else fill_all(__half{});
  BwdParams p = make_params(c, bu);
  const int64_t rows = c.b * c.h * c.n_q;
  if (!with_ref && rows > 0) fill_const<<<1024, 256>>>(bu.lse, rows, 8.f);
  if (with_ref && rows > 0) {
    if (c.bf16) ref_fwd_kernel<__nv_bfloat16><<<(rows + 127) / 128, 128>>>(p);
    else ref_fwd_kernel<__half><<<(rows + 127) / 128, 128>>>(p);
  }
  CK(cudaGetLastError());
  wait_or_die("reference forward");
  bu.ws_bytes = std::max(sm90_bwd_workspace_bytes(p), sm80_bwd_workspace_bytes(p));
  CK(cudaMalloc(&bu.ws, std::max<int64_t>(bu.ws_bytes, 256)));
  return bu;
}
void release(Buffers& bu) {
  for (void* x : {bu.q, bu.k, bu.v, bu.o, bu.dout, bu.dq, bu.dk, bu.dv, (void*)bu.lse, bu.ws}) cudaFree(x);
}

// variant 0: sm90_bwd, 1: sm80_bwd, 2: the persistent sm90 kernel on one block per SM, 3: the same
// on 2 blocks. Zeroes the workspace first (as ops.cpp does).
constexpr int kVariants = 4;
const char* const kVariantNames[kVariants] = {"sm90", "sm80", "sm90p", "sm90p2"};
bool is_sm90(int variant) { return variant != 1; }
void run_variant(int variant, const BwdParams& p, const Buffers& bu, cudaStream_t s) {
  CK(cudaMemsetAsync(bu.ws, 0, bu.ws_bytes, s));
  if (variant == 0) sm90_bwd(p, bu.ws, s);
  else if (variant == 1) sm80_bwd(p, bu.ws, s);
  else sm90_bwd_variant(p, bu.ws, s, variant == 2 ? 1 << 30 : 2);
}

const char* causal_name(Causal c) { return c == Causal::kNone ? "none" : c == Causal::kTopLeft ? "TL" : "BR"; }

struct Err {
  double rel = 0;
  int64_t nan = 0;
};
// Debug aid for a failing tensor [rows, d]: rel-L2 per (row % 128 / 16, column / 16) cell, so a
// layout bug shows as a pattern (one warp's rows, one panel's columns, every other 8 keys, ...).
void print_error_map(const char* what, const std::vector<float>& a, const std::vector<float>& b, int64_t d) {
  const int64_t rows = static_cast<int64_t>(a.size()) / d, cb = (d + 15) / 16;
  std::vector<double> num(8 * cb, 0.0), den(8 * cb, 0.0);
  int64_t worst = 0;
  double worst_err = -1;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < d; ++c) {
      const int64_t i = r * d + c, cell = ((r % 128) / 16) * cb + c / 16;
      const double e = std::isnan(a[i]) ? 1e30 : double(a[i]) - b[i];
      num[cell] += e * e;
      den[cell] += double(b[i]) * b[i];
      if (std::fabs(e) > worst_err) { worst_err = std::fabs(e); worst = i; }
    }
  std::printf("    %s: worst row %ld col %ld got %g want %g; rel-L2 by (row %% 128 / 16) x (col / 16):\n", what,
              worst / d, worst % d, a[worst], b[worst]);
  for (int rb = 0; rb < 8; ++rb) {
    std::printf("     ");
    for (int64_t c = 0; c < cb; ++c) {
      const int64_t cell = rb * cb + c;
      std::printf(" %8.1e", den[cell] > 0 ? std::sqrt(num[cell] / den[cell]) : std::sqrt(num[cell]));
    }
    std::printf("\n");
  }
}

// rel-L2 of a 16-bit device tensor against a float device reference; counts NaN. On an error above
// `tol` (with d > 0), prints the error map.
Err compare(const void* x, const float* ref, int64_t n, bool bf16, double tol = 1e30, int64_t d = 0,
            const char* what = "") {
  Err e;
  if (n == 0) return e;
  float* xf;
  CK(cudaMalloc(&xf, n * 4));
  if (bf16) to_float_kernel<<<1024, 256>>>(xf, static_cast<const __nv_bfloat16*>(x), n);
  else to_float_kernel<<<1024, 256>>>(xf, static_cast<const __half*>(x), n);
  CK(cudaDeviceSynchronize());
  std::vector<float> a(n), b(n);
  CK(cudaMemcpy(a.data(), xf, n * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(b.data(), ref, n * 4, cudaMemcpyDeviceToHost));
  cudaFree(xf);
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(a[i])) { ++e.nan; continue; }
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  e.rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  if (d > 0 && (e.nan > 0 || !(e.rel < tol))) print_error_map(what, a, b, d);
  return e;
}

// Returns true when every sm90 variant is within tolerance (and no NaN).
bool check(const Case& c, uint32_t seed) {
  Buffers bu = alloc(c, seed);
  const BwdParams p = make_params(c, bu);
  const int64_t nq = c.b * c.h * c.n_q * c.d, nk = c.b * c.h_kv * c.n_k * c.d, rows = c.b * c.h * c.n_q;
  float *dsum, *rdq, *rdk, *rdv;
  CK(cudaMalloc(&dsum, std::max<int64_t>(rows, 1) * 4));
  CK(cudaMalloc(&rdq, std::max<int64_t>(nq, 1) * 4));
  CK(cudaMalloc(&rdk, std::max<int64_t>(nk, 1) * 4));
  CK(cudaMalloc(&rdv, std::max<int64_t>(nk, 1) * 4));
  const int64_t krows = c.b * c.h_kv * c.n_k;
  if (c.bf16) {
    if (rows) ref_dsum_kernel<__nv_bfloat16><<<(rows + 127) / 128, 128>>>(p, dsum);
    if (rows) ref_dq_kernel<__nv_bfloat16><<<(rows + 127) / 128, 128>>>(p, dsum, rdq);
    if (krows) ref_dkv_kernel<__nv_bfloat16><<<(krows + 127) / 128, 128>>>(p, dsum, rdk, rdv);
  } else {
    if (rows) ref_dsum_kernel<__half><<<(rows + 127) / 128, 128>>>(p, dsum);
    if (rows) ref_dq_kernel<__half><<<(rows + 127) / 128, 128>>>(p, dsum, rdq);
    if (krows) ref_dkv_kernel<__half><<<(krows + 127) / 128, 128>>>(p, dsum, rdk, rdv);
  }
  CK(cudaGetLastError());
  wait_or_die("reference backward");
  const bool supported = sm90_bwd_supported(p);
  bool ok = supported;
  for (int variant = 0; variant < kVariants; ++variant) {
    if (c.bf16) {
      poison_kernel<<<1024, 256>>>((__nv_bfloat16*)bu.dq, nq);
      poison_kernel<<<1024, 256>>>((__nv_bfloat16*)bu.dk, nk);
      poison_kernel<<<1024, 256>>>((__nv_bfloat16*)bu.dv, nk);
    } else {
      poison_kernel<<<1024, 256>>>((__half*)bu.dq, nq);
      poison_kernel<<<1024, 256>>>((__half*)bu.dk, nk);
      poison_kernel<<<1024, 256>>>((__half*)bu.dv, nk);
    }
    CK(cudaGetLastError());
    run_variant(variant, p, bu, 0);
    CK(cudaGetLastError());
    wait_or_die(c.name);
    CK(cudaDeviceSynchronize());
    // bf16 / fp16 operands (and P, dS rounded to them) against an fp32 reference.
    const double tol = c.bf16 ? 3e-2 : 1e-2;
    const int64_t dd = is_sm90(variant) ? c.d : 0;  // error maps for sm90 only
    const Err eq = compare(bu.dq, rdq, nq, c.bf16, tol, dd, "dq"), ek = compare(bu.dk, rdk, nk, c.bf16, tol, dd, "dk"),
              ev = compare(bu.dv, rdv, nk, c.bf16, tol, dd, "dv");
    const bool v_ok = eq.nan + ek.nan + ev.nan == 0 && eq.rel < tol && ek.rel < tol && ev.rel < tol;
    if (is_sm90(variant)) ok = ok && v_ok;
    std::printf("  %-6s %-26s %s b%ld h%ld/%ld nq%ld nk%ld d%ld %-4s%s: rel_l2 dq %.2e dk %.2e dv %.2e  nan %ld,%ld,%ld  %s%s\n",
                kVariantNames[variant], c.name, c.bf16 ? "bf16" : "fp16", c.b, c.h, c.h_kv, c.n_q, c.n_k, c.d,
                causal_name(c.causal), c.bnhd ? " bnhd" : "", eq.rel, ek.rel, ev.rel, eq.nan, ek.nan, ev.nan,
                v_ok ? "OK" : "FAIL", is_sm90(variant) && !supported ? " (sm90_bwd_supported = false)" : "");
  }
  cudaFree(dsum); cudaFree(rdq); cudaFree(rdk); cudaFree(rdv);
  release(bu);
  return ok;
}

// Median ms of each timed variant (sm90, sm80, sm90p), interleaved launch by launch after a warm-up.
constexpr int kTimed = 3;
void time_all(const Case& c, double (&ms)[kTimed]) {
  Buffers bu = alloc(c, 7, false);
  const BwdParams p = make_params(c, bu);
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
  for (int w = 0; w < 2; ++w)
    for (int v = 0; v < kTimed; ++v) {
      run_variant(v, p, bu, 0);
      wait_or_die(w == 0 && v == 0 ? "first timed sm90 launch" : "warm-up");
    }
  CK(cudaGetLastError());
  std::vector<float> ts[kTimed];
  for (int r = 0; r < 10; ++r) {
    for (int v = 0; v < kTimed; ++v) {
      CK(cudaEventRecord(e0));
      run_variant(v, p, bu, 0);
      CK(cudaEventRecord(e1));
      wait_or_die("timing");
      float t; CK(cudaEventElapsedTime(&t, e0, e1));
      ts[v].push_back(t);
    }
  }
  CK(cudaGetLastError());
  for (int v = 0; v < kTimed; ++v) {
    std::sort(ts[v].begin(), ts[v].end());
    ms[v] = ts[v][ts[v].size() / 2];
  }
  cudaEventDestroy(e0); cudaEventDestroy(e1);
  release(bu);
}

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs, cc %d.%d\n", prop.name, prop.multiProcessorCount, prop.major, prop.minor);
  const char* mode = argc >= 2 ? argv[1] : "all";
  const bool small = std::strcmp(mode, "small") == 0;
  const bool do_check = small || std::strcmp(mode, "check") == 0 || std::strcmp(mode, "all") == 0;
  const bool do_time = std::strcmp(mode, "time") == 0 || std::strcmp(mode, "all") == 0;
  int fails = 0, checks = 0;
  if (do_check) {
    const Causal N = Causal::kNone, TL = Causal::kTopLeft, BR = Causal::kBottomRight;
    // small: the first five, so a hang shows in seconds. The third reuses every ring stage; the
    // fourth and fifth give each sm90p2 block several items (d64: 9, 3, 0 and 6, 0, 0 iterations;
    // d128: 3, 1, 0, 0, 0 twice): odd counts carry the ring and the dS^T buffer across items.
    const std::vector<Case> cases = {
        {"tiny d64", true, 1, 1, 1, 128, 128, 64, N, false},
        {"tiny d128", true, 1, 1, 1, 128, 128, 128, N, false},
        {"stage reuse GQA 4/1 TL", false, 1, 4, 1, 300, 129, 128, TL, false},
        {"items GQA 3/1 TL d64", false, 1, 3, 1, 384, 700, 64, TL, false},
        {"items TL d128", true, 1, 2, 2, 192, 640, 128, TL, false},
        {"one block causal d128", true, 1, 2, 2, 128, 128, 128, TL, false},
        {"one block causal d64", true, 1, 2, 2, 128, 128, 64, TL, false},
        {"1k d128", true, 2, 4, 4, 1024, 1024, 128, N, false},
        {"1k d64", true, 2, 4, 4, 1024, 1024, 64, N, false},
        {"1k d128 causal", true, 2, 4, 4, 1024, 1024, 128, TL, false},
        {"1k d64 causal", true, 2, 4, 4, 1024, 1024, 64, TL, false},
        {"fp16 d128", false, 2, 4, 4, 1024, 1024, 128, N, false},
        {"fp16 d64 causal", false, 2, 4, 4, 1024, 1024, 64, TL, false},
        {"ragged 1000/777", true, 2, 3, 3, 1000, 777, 128, N, false},
        {"ragged 1000/777 d64", true, 2, 3, 3, 1000, 777, 64, N, false},
        {"ragged TL", true, 2, 3, 3, 1000, 777, 128, TL, false},
        {"ragged BR d64", true, 2, 3, 3, 1000, 777, 64, BR, false},
        {"BR nq<nk", true, 2, 4, 4, 300, 1000, 128, BR, false},
        {"BR nq<nk d64", true, 2, 4, 4, 300, 1000, 64, BR, false},
        {"TL nq<nk (unseen keys)", true, 2, 4, 4, 300, 1000, 64, TL, false},
        {"BR nq>nk (empty rows)", true, 1, 2, 2, 1000, 300, 128, BR, false},
        {"GQA 16/2", true, 2, 16, 2, 512, 512, 128, N, false},
        {"GQA 16/2 causal d64", true, 2, 16, 2, 512, 512, 64, TL, false},
        {"bnhd strides", true, 2, 4, 4, 1000, 1000, 128, N, true},
        {"bnhd strides fp16 BR", false, 2, 4, 4, 513, 1000, 64, BR, true},
        {"n=1", true, 1, 1, 1, 1, 1, 128, N, false},
        {"n=1 d64", true, 1, 1, 1, 1, 1, 64, N, false},
        {"n_q=1 n_k=300 BR", true, 1, 2, 2, 1, 300, 64, BR, false},
        {"2k d128 causal", true, 1, 4, 4, 2048, 2048, 128, TL, false},
        // More work items than a 132-SM card has SMs, so sm90p blocks loop too. TL with n_q a
        // multiple of kBlockM and n_k > n_q: key blocks past n_q have no iterations. 396 items,
        // (d128) 15, 7, 0 / 13, 5, 0 / 11, 3, 0 / 9, 1, 0 iterations per block (33 heads apart).
        {"persist odd tiles TL d128", true, 3, 11, 11, 960, 1500, 128, TL, false},
        {"persist odd tiles TL d64", false, 3, 11, 11, 896, 1500, 64, TL, false},
        {"persist 1k d128 causal", true, 4, 16, 16, 1024, 1024, 128, TL, false},
        {"persist GQA 3/1 BR d64", true, 2, 36, 12, 500, 700, 64, BR, false},
        {"persist GQA 2/1 d128", true, 4, 16, 8, 640, 1000, 128, N, false},
    };
    // `check N`: case N only (debugging one failure).
    const int only = argc >= 3 ? std::atoi(argv[2]) : -1;
    for (size_t ci = 0; ci < cases.size(); ++ci) {
      if (small && ci >= 5) break;
      if (only >= 0 && static_cast<int>(ci) != only) continue;
      ++checks;
      if (!check(cases[ci], 1234 + checks)) ++fails;
    }
    std::printf("correctness (sm90, sm90p, sm90p2): %d / %d passed\n", checks - fails, checks);
  }
  if (std::strcmp(mode, "prof") == 0 && argc >= 5) {  // `prof d n causal`: three sm90 runs of one grid point (ncu)
    const int d = std::atoi(argv[2]);
    const int64_t n = std::atoll(argv[3]), b = 16384 / n, h = 2048 / d;
    const Case c{"prof", true, b, h, h, n, n, d, std::atoi(argv[4]) ? Causal::kTopLeft : Causal::kNone, false};
    Buffers bu = alloc(c, 7, false);
    const BwdParams p = make_params(c, bu);
    for (int r = 0; r < 3; ++r) run_variant(0, p, bu, 0);
    wait_or_die("prof");
    release(bu);
  }
  if (do_time) {
    std::printf("\n%-5s %-6s %6s %7s | %8s %8s %8s  (bwd TFLOP/s = 2.5 x 4 b h n^2 d [/2 causal] / median time, incl. workspace memset)\n",
                "d", "causal", "n", "b x h", kVariantNames[0], kVariantNames[1], kVariantNames[2]);
    for (int d : {64, 128}) {
      for (bool causal : {false, true}) {
        for (int64_t n : {1024, 2048, 4096, 8192, 16384}) {
          const int64_t b = 16384 / n, h = 2048 / d;
          const Case c{"grid", true, b, h, h, n, n, d, causal ? Causal::kTopLeft : Causal::kNone, false};
          const double flop = 2.5 * 4.0 * b * h * n * n * d / (causal ? 2.0 : 1.0);
          double ms[kTimed];
          time_all(c, ms);
          std::printf("%-5d %-6s %6ld %3ldx%-3ld | %8.1f %8.1f %8.1f   (%.3f / %.3f / %.3f ms)\n", d,
                      causal ? "yes" : "no", n, b, h, flop / (ms[0] * 1e-3) / 1e12, flop / (ms[1] * 1e-3) / 1e12,
                      flop / (ms[2] * 1e-3) / 1e12, ms[0], ms[1], ms[2]);
        }
      }
    }
  }
  return fails ? 1 : 0;
}
