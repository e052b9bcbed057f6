// Standalone check + timing of the Hopper forward (csrc/cuda/sm90_fwd.cu) without torch.
//
//   nvcc -O3 -std=c++17 --expt-relaxed-constexpr -DFLASH_MHA_WITH_CUDA -Icsrc \
//        -gencode arch=compute_90a,code=sm_90a -o .bin/sm90_harness benchmarks/sm90_harness.cu \
//        csrc/cuda/sm80_fwd.cu csrc/cuda/sm80_bwd.cu csrc/cuda/simt_attention.cu csrc/cuda/dispatch.cu
//   ./.bin/sm90_harness            # correctness cases, then the standard timing grid
//
// The .cu is included so that both kernel variants (kOverlap on / off) can be launched directly.
// Inputs: random bf16 / fp16 from a hash (never zeros); o and lse poisoned with NaN before each
// checked run; a naive fp32 reference kernel (one thread per query row, online softmax) on a
// sample of rows; every element of o and lse is scanned for NaN (unwritten). Timing: CUDA events,
// median of 20 after 3 warm-ups, TFLOP/s = 4 b h n_q n_k d (/2 causal) / time.
#include <algorithm>
#include <chrono>
#include <thread>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../csrc/cuda/sm90_fwd.cu"
#include "harness_common.cuh"

using namespace flash_mha;
using namespace flash_mha::cuda;

__global__ void poison_f32(float* x, int64_t n) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    x[i] = __int_as_float(0x7fc00000);
}

// Reference for the rows listed in `rows` (flat index (bi * h + hi) * n_q + i): out [nrows, d_v], lse [nrows].
template <typename T>
__global__ void ref_kernel(FwdParams p, const int64_t* rows, int64_t nrows, float* out, float* lse_out) {
  const int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (r >= nrows) return;
  const int64_t flat = rows[r];
  const int64_t i = flat % p.n_q, bh = flat / p.n_q, hi = bh % p.h, bi = bh / p.h;
  const int64_t kvh = hi / (p.h / p.h_kv);
  const T* q = static_cast<const T*>(p.q) + bi * p.q_sb + hi * p.q_sh + i * p.q_sn;
  const T* k = static_cast<const T*>(p.k) + bi * p.k_sb + kvh * p.k_sh;
  const T* v = static_cast<const T*>(p.v) + bi * p.v_sb + kvh * p.v_sh;
  float qf[128], acc[128];
  for (int c = 0; c < p.d; ++c) qf[c] = to_acc<float>(q[c]);
  for (int c = 0; c < p.d_v; ++c) acc[c] = 0.f;
  float m = -INFINITY, l = 0.f;
  const int64_t shift = p.causal == Causal::kBottomRight ? p.n_k - p.n_q : 0;
  for (int64_t j = 0; j < p.n_k; ++j) {
    if (p.causal != Causal::kNone && j > i + shift) break;
    float s = 0.f;
    for (int c = 0; c < p.d; ++c) s += qf[c] * to_acc<float>(k[j * p.k_sn + c]);
    s *= static_cast<float>(p.scale);
    const float mn = fmaxf(m, s);
    const float a = expf(m - mn), e = expf(s - mn);
    l = l * a + e;
    for (int c = 0; c < p.d_v; ++c) acc[c] = acc[c] * a + e * to_acc<float>(v[j * p.v_sn + c]);
    m = mn;
  }
  for (int c = 0; c < p.d_v; ++c) out[r * p.d_v + c] = l > 0.f ? acc[c] / l : 0.f;
  lse_out[r] = l > 0.f ? m + logf(l) : INFINITY;
}

float bf2f(uint16_t x, bool bf) {
  if (bf) {
    uint32_t u = static_cast<uint32_t>(x) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half h;
  std::memcpy(&h, &x, 2);
  return __half2float(h);
}

struct Case {
  const char* name;
  bool bf16;
  int64_t b, h, h_kv, n_q, n_k, d;
  Causal causal;
  bool bnhd;  // [b, n, h, d] layout (strided heads) instead of [b, h, n, d]
};

struct Buffers {
  void *q = nullptr, *k = nullptr, *v = nullptr, *o = nullptr;
  float* lse = nullptr;
};

FwdParams make_params(const Case& c, const Buffers& bu) {
  FwdParams p{};
  p.dtype = c.bf16 ? Dtype::kBFloat16 : Dtype::kFloat16;
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
  p.scale = 1.0 / std::sqrt(static_cast<double>(c.d));
  p.causal = c.causal;
  p.dropout_p = 0.0;
  p.dropout_threshold = 0;
  return p;
}

Buffers alloc(const Case& c, uint32_t seed) {
  Buffers bu;
  const int64_t nq = c.b * c.h * c.n_q * c.d, nk = c.b * c.h_kv * c.n_k * c.d;
  CK(cudaMalloc(&bu.q, nq * 2)); CK(cudaMalloc(&bu.k, nk * 2)); CK(cudaMalloc(&bu.v, nk * 2));
  CK(cudaMalloc(&bu.o, nq * 2)); CK(cudaMalloc(&bu.lse, c.b * c.h * c.n_q * 4));
  // q . k * scale has std ~ 2.5 (peaked but not one-hot softmax rows).
  if (c.bf16) {
    fill_kernel<<<1024, 256>>>((__nv_bfloat16*)bu.q, nq, seed * 3 + 1, 2.5f * 1.732f);
    fill_kernel<<<1024, 256>>>((__nv_bfloat16*)bu.k, nk, seed * 3 + 2, 1.732f);
    fill_kernel<<<1024, 256>>>((__nv_bfloat16*)bu.v, nk, seed * 3 + 3, 1.f);
  } else {
    fill_kernel<<<1024, 256>>>((__half*)bu.q, nq, seed * 3 + 1, 2.5f * 1.732f);
    fill_kernel<<<1024, 256>>>((__half*)bu.k, nk, seed * 3 + 2, 1.732f);
    fill_kernel<<<1024, 256>>>((__half*)bu.v, nk, seed * 3 + 3, 1.f);
  }
  CK(cudaGetLastError());
  return bu;
}
void release(Buffers& bu) {
  cudaFree(bu.q); cudaFree(bu.k); cudaFree(bu.v); cudaFree(bu.o); cudaFree(bu.lse);
}

// variant (every sm90 one: intra-warpgroup overlap; 128-key tiles; 2 consumer warpgroups for
// d = 128, 3 for d = 64):
//   0 = no ping-pong, grid of work units; 1 = ping-pong, grid of work units;
//   2 = ping-pong, persistent (the default for d = 64); 3 = no ping-pong, persistent (the default
//   for d = 128); 4 = the sm80 path
constexpr int kVariants = 5;
const char* const kVariantNames[kVariants] = {"ovl", "pp", "pp-pers", "ovl-pers", "sm80"};
template <typename T, int kD>
bool run_sm90(int variant, const FwdParams& p, cudaStream_t s) {
  constexpr int kC = kD == 64 ? 3 : 2;
  if (variant == 0) return launch<T, kD, 128, kC, false, false>(p, s);
  if (variant == 1) return launch<T, kD, 128, kC, true, false>(p, s);
  if (variant == 2) return launch<T, kD, 128, kC, true, true>(p, s);
  return launch<T, kD, 128, kC, false, true>(p, s);
}
constexpr int kDispatch = kVariants;  // check only: flash_mha::cuda_fwd, the default dispatch
bool run_variant(int variant, const FwdParams& p, cudaStream_t s) {
  const bool bf = p.dtype == Dtype::kBFloat16;
  if (variant == kDispatch) { cuda_fwd(p, s); return true; }
  if (variant == 4) { sm80_fwd(p, s); return true; }
  if (p.d == 64) return bf ? run_sm90<__nv_bfloat16, 64>(variant, p, s) : run_sm90<__half, 64>(variant, p, s);
  return bf ? run_sm90<__nv_bfloat16, 128>(variant, p, s) : run_sm90<__half, 128>(variant, p, s);
}

const char* causal_name(Causal c) { return c == Causal::kNone ? "none" : c == Causal::kTopLeft ? "TL" : "BR"; }

// Returns true when within tolerance.
bool check(const Case& c, int variant, uint32_t seed) {
  Buffers bu = alloc(c, seed);
  const FwdParams p = make_params(c, bu);
  const int64_t no = c.b * c.h * c.n_q * c.d, nl = c.b * c.h * c.n_q;
  if (c.bf16) poison_kernel<<<1024, 256>>>((__nv_bfloat16*)bu.o, no);
  else poison_kernel<<<1024, 256>>>((__half*)bu.o, no);
  poison_f32<<<1024, 256>>>(bu.lse, nl);
  CK(cudaGetLastError());
  if (!sm90_fwd_supported(p) && variant != 4) std::printf("  (sm90_fwd_supported = false for %s)\n", c.name);
  if (!run_variant(variant, p, 0)) { std::printf("  %s: launch refused (tensor map)\n", c.name); release(bu); return false; }
  CK(cudaGetLastError());
  wait_or_die(c.name);
  CK(cudaDeviceSynchronize());

  // Sample rows: all when small, else ~16k spread over (b, h, i) plus each head's last row.
  std::vector<int64_t> rows;
  const int64_t total = nl;
  if (total <= 16384) {
    for (int64_t r = 0; r < total; ++r) rows.push_back(r);
  } else {
    const int64_t step = total / 16384 + 1;
    for (int64_t r = seed % step; r < total; r += step) rows.push_back(r);
    for (int64_t bh = 0; bh < c.b * c.h; bh += 7) rows.push_back(bh * c.n_q + c.n_q - 1);
  }
  const int64_t nr = rows.size();
  int64_t* drows; float *dref, *dlse;
  CK(cudaMalloc(&drows, nr * 8)); CK(cudaMalloc(&dref, nr * c.d * 4)); CK(cudaMalloc(&dlse, nr * 4));
  CK(cudaMemcpy(drows, rows.data(), nr * 8, cudaMemcpyHostToDevice));
  if (c.bf16) ref_kernel<__nv_bfloat16><<<(nr + 127) / 128, 128>>>(p, drows, nr, dref, dlse);
  else ref_kernel<__half><<<(nr + 127) / 128, 128>>>(p, drows, nr, dref, dlse);
  CK(cudaGetLastError());
  CK(cudaDeviceSynchronize());
  std::vector<float> ref(nr * c.d), rlse(nr), lse(nl);
  std::vector<uint16_t> o(no);
  CK(cudaMemcpy(ref.data(), dref, ref.size() * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(rlse.data(), dlse, nr * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(o.data(), bu.o, no * 2, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(lse.data(), bu.lse, nl * 4, cudaMemcpyDeviceToHost));
  int64_t nan_o = 0, nan_l = 0;
  for (int64_t x = 0; x < no; ++x) nan_o += std::isnan(bf2f(o[x], c.bf16));
  for (int64_t x = 0; x < nl; ++x) nan_l += std::isnan(lse[x]);
  double num = 0, den = 0, max_abs = 0, max_lse = 0;
  int64_t lse_inf_mismatch = 0;
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t flat = rows[r], i = flat % c.n_q, bh = flat / c.n_q, hi = bh % c.h, bi = bh / c.h;
    const int64_t ob = bi * p.o_sb + hi * p.o_sh + i * p.o_sn;
    for (int64_t col = 0; col < c.d; ++col) {
      const double a = bf2f(o[ob + col], c.bf16), b = ref[r * c.d + col];
      num += (a - b) * (a - b); den += b * b;
      max_abs = std::max(max_abs, std::fabs(a - b));
    }
    const float ours = lse[flat], want = rlse[r];
    if (std::isinf(want) || std::isinf(ours)) lse_inf_mismatch += !(std::isinf(want) && std::isinf(ours) && ours > 0);
    else max_lse = std::max(max_lse, (double)std::fabs(ours - want));
  }
  const double rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  const double tol = c.bf16 ? 1e-2 : 2e-3;
  const bool ok = nan_o == 0 && nan_l == 0 && rel < tol && max_lse < 1e-2 && lse_inf_mismatch == 0 && !std::isnan(rel);
  std::printf("  %-4s %-26s %s b%ld h%ld/%ld nq%ld nk%ld d%ld %s%s: rel_l2 %.2e max_abs %.2e lse_max %.2e nan(o,lse) %ld,%ld inf_mismatch %ld  %s\n",
              variant == kDispatch ? "auto" : kVariantNames[variant], c.name, c.bf16 ? "bf16" : "fp16", c.b, c.h, c.h_kv,
              c.n_q, c.n_k, c.d, causal_name(c.causal), c.bnhd ? " bnhd" : "", rel, max_abs, max_lse, nan_o, nan_l,
              lse_inf_mismatch, ok ? "OK" : "FAIL");
  cudaFree(drows); cudaFree(dref); cudaFree(dlse);
  release(bu);
  return ok;
}

// Median ms of each variant; the variants take turns launch by launch (after a warm-up), so clock
// and temperature drift hits them alike.
void time_all(const Case& c, double (&ms)[kVariants]) {
  Buffers bu = alloc(c, 7);
  const FwdParams p = make_params(c, bu);
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
  for (int w = 0; w < 2; ++w)
    for (int v = 0; v < kVariants; ++v) run_variant(v, p, 0);
  CK(cudaGetLastError());
  wait_or_die("warm-up");
  std::vector<float> ts[kVariants];
  for (int r = 0; r < 15; ++r) {
    for (int v = 0; v < kVariants; ++v) {
      CK(cudaEventRecord(e0));
      run_variant(v, p, 0);
      CK(cudaEventRecord(e1));
      CK(cudaEventSynchronize(e1));
      float t; CK(cudaEventElapsedTime(&t, e0, e1));
      ts[v].push_back(t);
    }
  }
  CK(cudaGetLastError());
  wait_or_die("timing");
  for (int v = 0; v < kVariants; ++v) {
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
  std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  // argv[1]: "check" (correctness only), "time" (timing only), "small" (the small correctness
  // cases only: for compute-sanitizer); nothing: both.
  const bool small = argc >= 2 && std::strcmp(argv[1], "small") == 0;
  const bool do_check = argc < 2 || std::strcmp(argv[1], "time") != 0;
  const bool do_time = argc < 2 || std::strcmp(argv[1], "check") != 0 && !small;
  int fails = 0, checks = 0;
  if (do_check) {
    const Causal N = Causal::kNone, TL = Causal::kTopLeft, BR = Causal::kBottomRight;
    std::vector<Case> cases = {
        {"small", true, 1, 2, 2, 128, 128, 64, N, false},
        {"small d128", true, 1, 2, 2, 128, 128, 128, N, false},
        {"one tile causal", true, 1, 2, 2, 128, 128, 128, TL, false},
        {"grid 2k", true, 2, 8, 8, 2048, 2048, 128, N, false},
        {"grid 2k causal", true, 2, 8, 8, 2048, 2048, 128, TL, false},
        {"grid 2k d64", true, 2, 8, 8, 2048, 2048, 64, N, false},
        {"grid 2k d64 causal", true, 2, 8, 8, 2048, 2048, 64, TL, false},
        {"fp16 d128", false, 2, 4, 4, 1024, 1024, 128, N, false},
        {"fp16 d64 causal", false, 2, 4, 4, 1024, 1024, 64, TL, false},
        {"ragged", true, 2, 3, 3, 1000, 777, 128, N, false},
        {"ragged d64", true, 2, 3, 3, 1000, 777, 64, N, false},
        {"ragged TL", true, 2, 3, 3, 1000, 777, 128, TL, false},
        {"ragged BR", true, 2, 3, 3, 1000, 777, 64, BR, false},
        {"BR nq<nk", true, 2, 4, 4, 300, 1000, 128, BR, false},
        {"TL nq<nk", true, 2, 4, 4, 300, 1000, 64, TL, false},
        {"BR nq>nk empty rows", true, 1, 2, 2, 1000, 300, 128, BR, false},
        {"GQA 16/2", true, 2, 16, 2, 1024, 1024, 128, N, false},
        {"GQA 16/2 causal d64", true, 2, 16, 2, 1024, 1024, 64, TL, false},
        {"bnhd strides", true, 2, 4, 4, 1000, 1000, 128, N, true},
        {"bnhd strides fp16 BR", false, 2, 4, 4, 513, 1000, 64, BR, true},
        {"tiny n=1", true, 1, 1, 1, 1, 1, 128, N, false},
        {"n_q=1 n_k=300 BR", true, 1, 2, 2, 1, 300, 64, BR, false},
        {"16k d128 causal", true, 1, 16, 16, 16384, 16384, 128, TL, false},
    };
    for (int variant : {kDispatch, 0, 1, 2, 3}) {  // the default dispatch, then every sm90 variant
      for (const Case& c : cases) {
        if (small && c.b * c.h * c.n_q * c.n_k > 4 * 1000 * 1000) continue;
        if (variant != kDispatch && c.n_q >= 16384) continue;  // the large case once
        ++checks;
        if (!check(c, variant, 1234 + checks)) ++fails;
      }
    }
    std::printf("correctness: %d / %d passed\n", checks - fails, checks);
  }
  if (do_time) {
    std::printf("\n%-5s %-6s %6s %7s | %8s %8s %8s %8s %8s  (TFLOP/s, median of interleaved runs; ovl = intra-warpgroup overlap, pp = + ping-pong, -pers = persistent grid, sm80 = mma.sync path)\n",
                "d", "causal", "n", "b x h", kVariantNames[0], kVariantNames[1], kVariantNames[2],
                kVariantNames[3], kVariantNames[4]);
    for (int d : {64, 128}) {
      for (bool causal : {false, true}) {
        for (int64_t n : {1024, 2048, 4096, 8192, 16384}) {
          const int64_t b = 16384 / n, h = 2048 / d;
          Case c{"grid", true, b, h, h, n, n, d, causal ? Causal::kTopLeft : Causal::kNone, false};
          const double flop = 4.0 * b * h * n * n * d / (causal ? 2.0 : 1.0);
          double tf[kVariants];
          time_all(c, tf);
          for (int v = 0; v < kVariants; ++v) tf[v] = flop / (tf[v] * 1e-3) / 1e12;
          std::printf("%-5d %-6s %6ld %3ldx%-3ld | %8.1f %8.1f %8.1f %8.1f %8.1f\n", d, causal ? "yes" : "no", n, b, h, tf[0],
                      tf[1], tf[2], tf[3], tf[4]);
        }
      }
    }
  }
  return fails ? 1 : 0;
}
