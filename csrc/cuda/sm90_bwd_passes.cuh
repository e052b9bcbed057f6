// Hopper backward (sm90_bwd.cu): the passes beside the main kernel. The prep kernel (D, lse2, and a
// zeroed dQ accumulator), the convert kernel (dQ accumulator -> dq) and, in deterministic mode, the
// dbias reduce kernel. Included by sm90_bwd.cu only.
#pragma once

#include "common.cuh"
#include "ptx.cuh"
#include "sm90_bwd_work.cuh"
#include "softmax.cuh"  // kLog2e

namespace flash_mha::cuda {
namespace {

// Per padded row: D = sum_c dO[c] O[c] and lse2 = lse log2(e) (+inf and 0 past n_q). d_v / 8
// threads a row (8 or 16: a row's threads share a warp), each summing 8 columns: one 16-byte load
// of o and of dout when `vec` (both 16-byte aligned, strides multiples of 8), else 2-byte loads.
// Grid-stride over threads rounded up to whole warps, so every lane of a warp reaches the shuffles.
// Thread t also zeroes dq_acc[8 t, 8 t + 8): the dQ accumulator (n_qt kBlockM <= n_q_pad rows of d
// floats a (batch, head)) has at most as many 8-float groups as there are threads; and, in
// deterministic mode, the order flag of tile t.
template <typename T>
__global__ void __launch_bounds__(256) sm90_bwd_prep_kernel(const BwdParams p, Sm90BwdWorkspace ws, bool vec) {
  const int per_row = p.d_v / 8;
  const int64_t rows = p.b * p.h * ws.n_q_pad;
  const int64_t threads = (rows * per_row + 31) / 32 * 32;
  const int64_t dq_groups = p.b * p.h * ws.n_qt * (kDqTileFloats / 8);
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < threads;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (t < dq_groups) {
      float4* z = reinterpret_cast<float4*>(ws.dq_acc) + 2 * t;
      z[0] = make_float4(0.f, 0.f, 0.f, 0.f);
      z[1] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (ws.dq_order && t < dq_groups / (kDqTileFloats / 8)) ws.dq_order[t] = 0;  // one flag a tile
    }
    const int64_t row = t / per_row;  // (bi h + hi) n_q_pad + i
    const int c = static_cast<int>(t - row * per_row) * 8;
    const int64_t i = row % ws.n_q_pad, bh = row / ws.n_q_pad, hi = bh % p.h, bi = bh / p.h;
    float acc = 0.f;
    if (row < rows && i < p.n_q) {
      const T* o = static_cast<const T*>(p.o) + bi * p.o_sb + hi * p.o_sh + i * p.o_sn + c;
      const T* dout = static_cast<const T*>(p.dout) + bi * p.do_sb + hi * p.do_sh + i * p.do_sn + c;
      T a[8], b[8];
      if (vec) {
        *reinterpret_cast<uint4*>(a) = __ldg(reinterpret_cast<const uint4*>(o));
        *reinterpret_cast<uint4*>(b) = __ldg(reinterpret_cast<const uint4*>(dout));
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          a[j] = o[j];
          b[j] = dout[j];
        }
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) acc += to_acc<float>(a[j]) * to_acc<float>(b[j]);
    }
    for (int off = per_row / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (row < rows && c == 0) {
      // lse = +inf (no visible key) stays +inf: 2^(s - inf) = 0.
      ws.dsum[row] = i < p.n_q ? acc : 0.f;
      ws.lse2[row] = i < p.n_q ? static_cast<const float*>(p.lse)[bh * p.n_q + i] * kLog2e
                               : __int_as_float(0x7f800000);
    }
  }
}

// dq = scale * dq_acc in the input dtype (dq contiguous [b, h, n_q, d]), one query tile a call, by
// the 256 threads of a block (t: the consumer thread whose fragments it reads) sharing `stage`.
// A tile of dq_acc holds float4 `nt` of consumer thread t at [nt][t]: rows r, r + 8 and columns
// c, c + 1 of the tile, r = row0 + 16 warp + lane / 4, c = col0 + 8 nt + 2 (lane % 4) (warpgroup
// cw = t / 128: row0 or col0 = 64 cw, as the consumers split dQ). Coalesced 16-byte reads, scaled
// and packed into the shared [kBlockM, kD] tile (row pitch kD + 8 elements: the 8 rows a warp
// writes start 4 banks apart), then rows out in 16-byte chunks (`vec`: dq 16-byte aligned; else
// 4-byte stores). Rows past n_q are dropped.
template <typename T, typename Tr>
struct DqTileConverter {
  static constexpr int kTile4 = kDqTileFloats / 4, kThreadsC = 128 * Tr::kConsumers, kPitch = Tr::kD + 8;
  static constexpr int kStageElems = Tr::kBlockM * kPitch;
  static_assert(kThreadsC == 256, "one convert thread per consumer thread");
  int t, row, col0;
  float scale;
  __device__ __forceinline__ DqTileConverter(const BwdParams& p, int t_) : t(t_) {
    const int cw = t / 128, warp = (t % 128) / 32, lane = t % 32;
    row = (Tr::kDqSplitRows ? 64 * cw : 0) + 16 * warp + lane / 4;
    col0 = (Tr::kDqSplitRows ? 0 : 64 * cw) + 2 * (lane % 4);
    scale = static_cast<float>(p.scale);
  }

  __device__ __forceinline__ void run(const BwdParams& p, const Sm90BwdWorkspace& ws, int64_t tile, T* stage,
                                      bool vec) const {
    const float4* src = reinterpret_cast<const float4*>(ws.dq_acc) + tile * kTile4;
#pragma unroll
    for (int nt = 0; nt < kTile4 / kThreadsC; ++nt) {
      const float4 v = src[nt * kThreadsC + t];
      T* d = stage + row * kPitch + col0 + 8 * nt;
      *reinterpret_cast<uint32_t*>(d) = pack2<T>(v.x * scale, v.y * scale);
      *reinterpret_cast<uint32_t*>(d + 8 * kPitch) = pack2<T>(v.z * scale, v.w * scale);
    }
    __syncthreads();
    const int64_t bh = tile / ws.n_qt, i0 = (tile - bh * ws.n_qt) * Tr::kBlockM;
    constexpr int kChunks = Tr::kD / 8;  // 16-byte chunks a row
#pragma unroll
    for (int k = 0; k < Tr::kBlockM * kChunks / 256; ++k) {
      const int q = k * 256 + t, r = q / kChunks, c = (q % kChunks) * 8;
      if (i0 + r < p.n_q) {
        const uint4 v = *reinterpret_cast<const uint4*>(stage + r * kPitch + c);
        T* dst = static_cast<T*>(p.dq) + (bh * p.n_q + i0 + r) * Tr::kD + c;
        if (vec) {
          *reinterpret_cast<uint4*>(dst) = v;
        } else {
          uint32_t* d4 = reinterpret_cast<uint32_t*>(dst);
          d4[0] = v.x;
          d4[1] = v.y;
          d4[2] = v.z;
          d4[3] = v.w;
        }
      }
    }
    __syncthreads();  // before the next tile overwrites the stage
  }
};

// The convert pass: one block of 256 threads per query tile (grid-stride).
template <typename T, typename Tr>
__global__ void __launch_bounds__(256) sm90_bwd_convert_kernel(const BwdParams p, const Sm90BwdWorkspace ws,
                                                               bool vec) {
  using Cv = DqTileConverter<T, Tr>;
  __shared__ alignas(16) T tile_s[Cv::kStageElems];
  const Cv cv(p, threadIdx.x);
  const int64_t tiles = p.b * p.h * ws.n_qt;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x)
    cv.run(p, ws, tile, tile_s, vec);
}

// Deterministic mode, a dbias that blocks share (Sm90BwdWorkspace::dbias_full): dbias = the sum of
// dS (stored whole, [b, h, n_q, n_k] contiguous in T) over dbias's broadcast dims, one thread an
// element of dbias, adding in float32 in one fixed order (batch, head, query, key). Adjacent
// threads take adjacent keys where dbias has them, so the reads coalesce.
template <typename T>
__global__ void __launch_bounds__(256) sm90_bwd_dbias_reduce_kernel(const BwdParams p, const T* full) {
  const Strided4& s = p.dbias_s;
  const int64_t ob = s.b ? p.b : 1, oh = s.h ? p.h : 1, oq = s.q ? p.n_q : 1, ok = s.k ? p.n_k : 1;
  const int64_t n = ob * oh * oq * ok;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t xk = e % ok, xq = e / ok % oq, xh = e / (ok * oq) % oh, xb = e / (ok * oq * oh);
    float acc = 0.f;
    for (int64_t bi = s.b ? xb : 0; bi < (s.b ? xb + 1 : p.b); ++bi)
      for (int64_t hi = s.h ? xh : 0; hi < (s.h ? xh + 1 : p.h); ++hi)
        for (int64_t i = s.q ? xq : 0; i < (s.q ? xq + 1 : p.n_q); ++i) {
          const T* row = full + ((bi * p.h + hi) * p.n_q + i) * p.n_k;
          for (int64_t j = s.k ? xk : 0; j < (s.k ? xk + 1 : p.n_k); ++j) acc += to_acc<float>(row[j]);
        }
    static_cast<T*>(p.dbias)[xb * s.b + xh * s.h + xq * s.q + xk * s.k] = from_acc<T>(acc);
  }
}

}  // namespace
}  // namespace flash_mha::cuda
