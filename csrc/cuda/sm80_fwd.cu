// Tensor-core forward for float16 / bfloat16 (sm_80+, mma.sync m16n8k16, fp32 accumulation).
//
// One block of 4 warps per (batch, head, 64-query tile); warp w owns query rows 16w .. 16w+15.
// K/V tiles of kBlockN keys stream through shared memory with cp.async, double buffered: tile t+1
// is in flight while tile t is used. Per tile: S = Q K^T (ldmatrix + mma), the score epilogue and
// online softmax in the log2 domain, dropout on the probabilities, then O += P V with P taken
// straight from the S accumulators. Causal tiles past the diagonal are never loaded.
// Head dims (d and d_v, multiples of 8) are padded with zeros up to kD in {64, 128, 256}.
#include "kernels.h"
#include "sm80_tile.cuh"
#include "softmax.cuh"

namespace flash_mha::cuda {
namespace {

template <typename T, int kD_>
struct FwdTraits {
  static constexpr int kD = kD_;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kWarps;
  // d = 256 halves the key tile so that two blocks fit on an SM (96 KiB each).
  static constexpr int kBlockN = kD <= 128 ? 64 : 32;
  struct Smem {
    T q[kBlockM * kD];     // [kBlockM, kD] swizzled
    T k[2][kBlockN * kD];  // [stage][kBlockN, kD] swizzled
    T v[2][kBlockN * kD];  // [stage][kBlockN, kD] swizzled
  };
  static_assert(sizeof(Smem) <= 160 * 1024, "forward tile exceeds sm_80 shared memory");
};

template <typename T, typename Tr>
__global__ void __launch_bounds__(Tr::kThreads) sm80_fwd_kernel(const FwdParams p) {
  constexpr int kD = Tr::kD, kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kThreads = Tr::kThreads;
  constexpr int kNS = kBlockN / 8;  // score n-tiles per warp
  constexpr int kNO = kD / 8;       // output n-tiles per warp
  extern __shared__ __align__(128) unsigned char smem_raw[];
  auto& sm = *reinterpret_cast<typename Tr::Smem*>(smem_raw);

  // Heaviest (last, for causal) query tiles first.
  const int64_t n_qb = (p.n_q + kBlockM - 1) / kBlockM;
  int64_t blk = blockIdx.x;
  const int64_t qb = n_qb - 1 - blk % n_qb;
  blk /= n_qb;
  const int64_t hi = blk % p.h, bi = blk / p.h;
  const int64_t kvh = hi / (p.h / p.h_kv);
  const int64_t i0 = qb * kBlockM;
  const int rows = static_cast<int>(imin(kBlockM, p.n_q - i0));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int d = static_cast<int>(p.d), dv = static_cast<int>(p.d_v);

  const T* qg = static_cast<const T*>(p.q) + bi * p.q_sb + hi * p.q_sh + i0 * p.q_sn;  // [rows, d]
  const T* kg = static_cast<const T*>(p.k) + bi * p.k_sb + kvh * p.k_sh;              // [n_k, d]
  const T* vg = static_cast<const T*>(p.v) + bi * p.v_sb + kvh * p.v_sh;              // [n_k, d_v]
  const int64_t key_end = visible_key_end(p, i0, rows);
  const int n_tiles = static_cast<int>((key_end + kBlockN - 1) / kBlockN);
  const int64_t shift = causal_shift(p);

  load_tile_async<kBlockM, kD, kThreads>(sm.q, qg, p.q_sn, rows, d);
  if (n_tiles > 0) {
    load_tile_async<kBlockN, kD, kThreads>(sm.k[0], kg, p.k_sn, static_cast<int>(imin(kBlockN, p.n_k)), d);
    load_tile_async<kBlockN, kD, kThreads>(sm.v[0], vg, p.v_sn, static_cast<int>(imin(kBlockN, p.n_k)), dv);
  }
  cp_async_commit_group();

  const ScoreCtx ctx(p, bi, hi);
  Dropout drop;
  drop.init(p);
  const uint64_t bh = static_cast<uint64_t>(bi * p.h + hi);
  OnlineSoftmax softmax;
  softmax.init();
  float o[kNO][4];  // [16 rows, kD] of this warp
  zero_acc(o);

  for (int t = 0; t < n_tiles; ++t) {
    const int stage = t & 1;
    if (t + 1 < n_tiles) {
      const int64_t jn = static_cast<int64_t>(t + 1) * kBlockN;
      const int valid = static_cast<int>(imin(kBlockN, p.n_k - jn));
      load_tile_async<kBlockN, kD, kThreads>(sm.k[stage ^ 1], kg + jn * p.k_sn, p.k_sn, valid, d);
      load_tile_async<kBlockN, kD, kThreads>(sm.v[stage ^ 1], vg + jn * p.v_sn, p.v_sn, valid, dv);
      cp_async_commit_group();
      cp_async_wait_group<1>();
    } else {
      cp_async_wait_group<0>();
    }
    __syncthreads();

    // S = Q K^T for this warp's 16 rows: [16, kBlockN]
    float s[kNS][4];
    zero_acc(s);
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      if (16 * kk < d) {
        uint32_t a[4];
        ldsm_a<kD>(a, sm.q, 16 * warp, kk);
#pragma unroll
        for (int np = 0; np < kNS / 2; ++np) {
          uint32_t b[4];
          ldsm_b<kD>(b, sm.k[stage], np, kk);
          mma_m16n8k16<T>(s[2 * np], a, b[0], b[1]);
          mma_m16n8k16<T>(s[2 * np + 1], a, b[2], b[3]);
        }
      }
    }

    const int64_t j0 = static_cast<int64_t>(t) * kBlockN;
    const bool diagonal = p.causal != Causal::kNone && j0 + kBlockN - 1 > i0 + shift;
    score_tile_log2<T, kNS, false>(ctx, s, i0 + 16 * warp, j0, diagonal);
    softmax.update(s, o);
    if (drop.on) dropout_tile_rows(drop, bh, s, i0 + 16 * warp, j0);

    // O += P V
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[4];
      acc_to_a<T>(a, s, kk);
#pragma unroll
      for (int np = 0; np < kNO / 2; ++np) {
        if (16 * np < dv) {
          uint32_t b[4];
          ldsm_b_trans<kD>(b, sm.v[stage], np, kk);
          mma_m16n8k16<T>(o[2 * np], a, b[0], b[1]);
          mma_m16n8k16<T>(o[2 * np + 1], a, b[2], b[3]);
        }
      }
    }
    __syncthreads();  // this stage is refilled by the next iteration's prefetch
  }

  // out = O / l (times 1 / (1 - p) for dropout); lse = (m + log2 l) ln 2; empty rows: 0, +inf.
  softmax.finish();
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t i = i0 + 16 * warp + lane / 4 + 8 * h;
    if (i >= p.n_q) continue;
    const float l = softmax.l[h];
    const float inv = l == 0.f ? 0.f : drop.keep_scale / l;
    T* og = static_cast<T*>(p.o) + bi * p.o_sb + hi * p.o_sh + i * p.o_sn;
#pragma unroll
    for (int nt = 0; nt < kNO; ++nt) {
      const int col = 8 * nt + 2 * (lane % 4);
      if (col < dv) *reinterpret_cast<uint32_t*>(og + col) = pack2<T>(o[nt][2 * h] * inv, o[nt][2 * h + 1] * inv);
    }
    if (lane % 4 == 0) {
      float* lse = static_cast<float*>(p.lse) + bh * p.n_q + i;
      *lse = l == 0.f ? __int_as_float(0x7f800000) : (softmax.m[h] + __log2f(l)) * kLn2;
    }
  }
}

template <typename T, int kD>
void launch(const FwdParams& p, cudaStream_t stream) {
  using Tr = FwdTraits<T, kD>;
  const int64_t blocks = p.b * p.h * ceil_div(p.n_q, Tr::kBlockM);
  if (blocks == 0) return;
  constexpr int64_t smem = sizeof(typename Tr::Smem);
  allow_smem(sm80_fwd_kernel<T, Tr>, smem);
  sm80_fwd_kernel<T, Tr><<<static_cast<unsigned>(blocks), Tr::kThreads, smem, stream>>>(p);
}

template <typename T>
void dispatch_dim(const FwdParams& p, cudaStream_t stream) {
  const int64_t dim = p.d > p.d_v ? p.d : p.d_v;
  if (dim <= 64) return launch<T, 64>(p, stream);
  if (dim <= 128) return launch<T, 128>(p, stream);
  return launch<T, 256>(p, stream);
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

}  // namespace

// 16-byte cp.async rows: dims and row/head/batch strides in multiples of 8 elements, 16-byte
// aligned bases. Everything else (odd dims, exotic strides) runs on the SIMT kernels.
bool sm80_fwd_supported(const FwdParams& p) {
  if (p.dtype != Dtype::kFloat16 && p.dtype != Dtype::kBFloat16) return false;
  if (p.d % 8 || p.d_v % 8 || p.d > 256 || p.d_v > 256) return false;
  const int64_t strides[] = {p.q_sb, p.q_sh, p.q_sn, p.k_sb, p.k_sh, p.k_sn, p.v_sb, p.v_sh, p.v_sn};
  for (int64_t s : strides)
    if (s % 8) return false;
  if (p.o_sb % 2 || p.o_sh % 2 || p.o_sn % 2) return false;  // 4-byte output stores
  return aligned16(p.q) && aligned16(p.k) && aligned16(p.v) && (reinterpret_cast<uintptr_t>(p.o) & 3) == 0;
}

void sm80_fwd(const FwdParams& p, cudaStream_t stream) {
  if (p.dtype == Dtype::kFloat16) return dispatch_dim<__half>(p, stream);
  return dispatch_dim<__nv_bfloat16>(p, stream);
}

}  // namespace flash_mha::cuda
