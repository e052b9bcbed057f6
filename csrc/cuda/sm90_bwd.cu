// Hopper backward for float16 / bfloat16 (sm_90a): TMA + mbarrier + wgmma + warp specialization.
// The default backward on sm_90 for the shapes sm90_bwd_supported takes (dispatch.cu); verified and
// measured on an H200 (NOTES.md, "Hopper backward"); benchmarks/sm90_bwd_harness.cu checks it alone.
//
// Semantics follow sm80_bwd.cu: D = rowsum(dO * O), P = exp(scale q.k - lse), dS = P (dP - D),
// dV = P^T dO, dK = scale dS^T Q, dQ = scale dS K (float32 bulk reduce-adds, then converted).
//
// 1. prep kernel: per (batch, head) row padded to a multiple of 128 queries, lse2 = lse log2(e)
//    (+inf for rows past n_q or with no visible key) and D, into the workspace, so the main kernel
//    can fetch a tile's rows with one 16-byte-aligned bulk copy each.
// 2. main kernel: one block per (batch, kv head, 128 keys); causal items in bands of heads, key
//    block slowest inside a band (ItemGrid::band). Warpgroup 0 (24 registers) holds the
//    producer thread, the dQ writer warp and (kDbiasWriterWarps, off) two dbias writer warps. The
//    producer loads K and V of the block once, then for each query head of the GQA group and each
//    query tile of kBlockM rows that can see the block (causal: from the diagonal on), Q, dO (TMA,
//    128-byte swizzle) and the lse2 / D rows (bulk copies) into a kStages-deep ring (full / empty
//    mbarriers per stage). Consumer
//    warpgroups 1, 2 own keys 64 (wg - 1) .. + 63 and keep their dK, dV [64, d] in registers.
//    Per query tile, in the transposed (key-row) layout:
//      S^T = K Q^T, dP^T = V dO^T            (wgmma SS, both K-major, N = kBlockM)
//      P^T = 2^(S^T scale log2e - lse2)       (causal mask on diagonal tiles only; key mask rows;
//                                             kGeneral: + bias^T log2e, any mask, dropout Z)
//      dS^T = P^T (dP^T - D)                  (kGeneral: P^T (dP^T Z - D); dbias = dS, stored by
//                                             the consumers, or from the dS^T buffer by warps 2, 3
//                                             of warpgroup 0 with kDbiasWriterWarps)
//      dV += P^T dO, dK += dS^T Q             (wgmma RS: A = P^T / dS^T from registers, B MN-major)
//      dS^T -> shared memory [keys, queries]; named barrier over both consumer warpgroups
//      dQ[64, 64] = dS K                      (wgmma SS, both operands MN-major (transpose bits))
//    The warpgroups split dQ: d = 128 (kBlockM = 64): columns 64 (wg - 1) ..; d = 64
//    (kBlockM = 128): rows 64 (wg - 1) ... Both store their part to a shared-memory staging tile
//    (fragment order; the d = 64 general kernel's is the dS^T buffer the tile does not use, its own
//    bytes hold the bias tile: kDqInDs) and the dQ writer warp adds the whole tile to the float32
//    workspace with one cp.reduce.async.bulk (named barriers "full" / "empty" hand the staging tile
//    back and forth).
//    dS^T is double buffered, so one barrier per tile orders writes and reads.
//    After the last tile: dK (times scale) and dV out of registers, through the dS^T buffers as
//    16-byte row chunks (kStagedDkDv, one-block-per-item kernels) or by 4-byte stores (persistent).
// 3. convert kernel: dq = scale * workspace (undoing the fragment order), in the input dtype.
// GQA: a block walks every query head of its kv head's group, so dK / dV need no atomics.
// Persistent variant (use_persistent: d = 64 but long causal): min(#SMs, #items) blocks, each
// taking one item of every round of gridDim.x items (for_each_item). The producer loads the next
// item's K / V as soon as the consumers' last wgmma of the current item has read them (kv_empty),
// so the loads overlap the dK / dV epilogue; the ring, the dS^T buffers and the dQ hand-off run on
// across items.
// Keys past n_k read as zeros (TMA) and are masked (P = 0) in the last key block; their dK / dV
// rows are never stored. Queries past n_q read as zeros and have lse2 = +inf, so P = 0.
#include <algorithm>

#include <cuda.h>          // CUtensorMap and its enums (types only: nothing links libcuda)
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

// Unreferenced traits members are expected: the sm_80 pass compiles the kernel bodies out.
#pragma nv_diag_suppress 177

#include "kernels.h"
#include "sm80_tile.cuh"
#include "sm90.cuh"
#include "sm90_bwd_passes.cuh"  // prep and convert kernels
#include "sm90_bwd_work.cuh"    // configuration flags, traits, workspace, work items
#include "sm90_host.h"
#include "softmax.cuh"

namespace flash_mha::cuda {
namespace {

// Named barrier ids (0: __syncthreads); kBarEpi: both consumer warpgroups, kBarEpiWg + cw: one;
// kBarDsHalf + 2 cw + (t & 1): warpgroup cw's half of dS^T of tile t written (kSplitDsBarrier).
constexpr int kBarDs = 1, kBarDqFull = 2, kBarDqEmpty = 3, kBarEpi = 4, kBarEpiWg = 5, kBarDsHalf = 7;

// ---------------------------------------------------------------------------------------------
// Producer: one thread. Per work item K and V once, then per iteration Q, dO, lse2, D into ring
// stage t % kStages, t = tile + n counting the iterations of the block's items (see for_each_item).
template <typename T, typename Tr, bool kPersistent>
__device__ __forceinline__ void produce(typename Tr::Smem& sm, typename Tr::Barriers& bar, const BwdParams& p,
                                        const Sm90BwdWorkspace& ws, const BlockWork& w, int tile, int kv,
                                        const CUtensorMap* tm_q, const CUtensorMap* tm_k, const CUtensorMap* tm_v,
                                        const CUtensorMap* tm_do, const CUtensorMap* tm_bias) {
  using namespace sm90;
  if (w.n_iters == 0) return;  // nothing loaded: the consumers only write zeros
  // The consumers are done with the previous item's K / V (for_each_item: kv_empty phase kv - 1).
  if constexpr (kPersistent) mbarrier_wait(&bar.kv_empty, (kv & 1) ^ 1);
  mbarrier_arrive_expect_tx(&bar.kv_full, 2 * Tr::kKVBytes);
#pragma unroll
  for (int pn = 0; pn < Tr::kPanels; ++pn) {
    tma_load_4d(sm.k + pn * Tr::kBlockN * Tr::kPanel, tm_k, &bar.kv_full, pn * Tr::kPanel, w.j0, w.kvh, w.bi);
    tma_load_4d(sm.v + pn * Tr::kBlockN * Tr::kPanel, tm_v, &bar.kv_full, pn * Tr::kPanel, w.j0, w.kvh, w.bi);
  }
  for (int n = 0; n < w.n_iters; ++n) {
    const int t = tile + n;
    const int st = t % Tr::kStages;
    const uint32_t parity = ((t / Tr::kStages) & 1) ^ 1;  // a fresh empty barrier passes at once
    int hi, i0;
    w.at(n, Tr::kBlockM, hi, i0);
    mbarrier_wait(&bar.empty[st], parity);
    const bool bias_tile = Tr::kStageBias && p.bias;
    mbarrier_arrive_expect_tx(&bar.full[st], Tr::kStageBytes + (bias_tile && Tr::kBiasInRing ? Tr::kBiasBytes : 0));
#pragma unroll
    for (int pn = 0; pn < Tr::kPanels; ++pn) {
      tma_load_4d(sm.q[st] + pn * Tr::kBlockM * Tr::kPanel, tm_q, &bar.full[st], pn * Tr::kPanel, i0, hi, w.bi);
      tma_load_4d(sm.dout[st] + pn * Tr::kBlockM * Tr::kPanel, tm_do, &bar.full[st], pn * Tr::kPanel, i0, hi, w.bi);
    }
    // Broadcast dims have size 1 in the bias map: coordinate 0 there.
    auto load_bias = [&](T* dst, uint64_t* full) {
#pragma unroll
      for (int pn = 0; pn < Tr::kBlockN / Tr::kPanel; ++pn)
        tma_load_4d(dst + pn * Tr::kBlockM * Tr::kPanel, tm_bias, full, w.j0 + pn * Tr::kPanel, p.bias_s.q ? i0 : 0,
                    p.bias_s.h ? hi : 0, p.bias_s.b ? w.bi : 0);
    };
    if constexpr (Tr::kBiasInRing) {
      if (bias_tile) load_bias(sm.bias[st], &bar.full[st]);
    }
    const int64_t row = (int64_t{w.bi} * p.h + hi) * ws.n_q_pad + i0;  // 16-byte aligned: n_q_pad % 128 == 0
    bulk_load(sm.lse2[st], ws.lse2 + row, Tr::kRowBytes, &bar.full[st]);
    bulk_load(sm.dsum[st], ws.dsum + row, Tr::kRowBytes, &bar.full[st]);
    if constexpr (Tr::kDqInDs) {
      // The one buffer, once the consumers have read iteration t - 1's tile from it (bias_empty
      // phase t - 1; a fresh barrier passes parity 1 at once).
      if (bias_tile) {
        mbarrier_wait(&bar.bias_empty, (t & 1) ^ 1);
        mbarrier_arrive_expect_tx(&bar.bias_full, Tr::kBiasBytes);
        load_bias(sm.bias[0], &bar.bias_full);
      }
    }
  }
}

// dQ writer: warp 1 of the producer warpgroup. Per iteration, once the consumers have staged the
// tile, one bulk reduce-add of it into its block of dq_acc; the staging buffer is handed back as
// soon as the bulk operation has read it (deterministic mode: once it has added, in key-block
// order). Each consumer tile syncs "empty" once and arrives "full" once, so the writer arrives
// "empty" once per tile of the block (the first: the buffer starts free) and never after its last.
// Persistent: the arrival opens each tile instead of closing the previous one (same order), so the
// block's last tile needs no look-ahead over later items. kDqInDs (staging in dS^T buffer
// (t + 1) & 1, one-block-per-item only): the writer also arrives after the last tile, since the
// consumers reuse that buffer for the dK / dV epilogue and sync "empty" once more first.
template <typename Tr, bool kPersistent>
__device__ __forceinline__ void write_dq(typename Tr::Smem& sm, const BwdParams& p, const Sm90BwdWorkspace& ws,
                                         const BlockWork& w, int tile) {
  static_assert(!(Tr::kDqInDs && kPersistent), "dQ staging in dS^T: one block per item");
  using namespace sm90;
  if (w.n_iters == 0) return;
  const bool leader = threadIdx.x % 32 == 0;
  if constexpr (!kPersistent) named_barrier_arrive(kBarDqEmpty, Tr::kDqSyncThreads);  // the buffer starts free
  for (int n = 0; n < w.n_iters; ++n) {
    if constexpr (kPersistent) named_barrier_arrive(kBarDqEmpty, Tr::kDqSyncThreads);
    int hi, i0;
    w.at(n, Tr::kBlockM, hi, i0);
    named_barrier_sync(kBarDqFull, Tr::kDqSyncThreads);  // the consumers staged tile n
    if (leader) {
      const int64_t dq_tile = (int64_t{w.bi} * p.h + hi) * ws.n_qt + i0 / Tr::kBlockM;
      // Deterministic mode: key block kb adds after key blocks 0 .. kb - 1 (Sm90BwdWorkspace).
      if (ws.dq_order) {
        while (ld_acquire_gpu(ws.dq_order + dq_tile) != w.kb) {
        }
        fence_proxy_async_global();  // the earlier blocks' additions before this one's
      }
      bulk_reduce_add_f32(ws.dq_acc + dq_tile * kDqTileFloats, Tr::dq_stage(sm, tile + n), kDqTileFloats * 4);
      bulk_commit_group();
      if (ws.dq_order) {
        bulk_wait_group<0>();  // added (not only read), then the next key block's turn
        fence_proxy_async_global();
        red_release_gpu_add(ws.dq_order + dq_tile, 1);
      } else {
        bulk_wait_group_read<0>();
      }
    }
    __syncwarp();
    if (!kPersistent && (n + 1 < w.n_iters || Tr::kDqInDs)) named_barrier_arrive(kBarDqEmpty, Tr::kDqSyncThreads);
  }
  if (leader && !kPersistent) bulk_wait_group<0>();  // persistent: once, after the block's last item
}

// ---------------------------------------------------------------------------------------------
// Consumer warpgroup cw (0 or 1): keys j0 + 64 cw .. + 63; warp `warp` of it keys + 16 warp ...

// Byte offset of element (row, col) in a tile of `rows` rows stored as 64-column panels of
// [rows, 64] with the 128-byte swizzle (16-byte chunk c of row r at chunk c ^ (r % 8)).
__device__ __forceinline__ uint32_t sw128_offset(int row, int col, int rows) {
  return (col / 64) * rows * 128 + row * 128 + ((((col % 64) / 8) ^ (row % 8)) << 4) + (col % 8) * 2;
}

// Threads on named barrier kBarDs: the consumers, plus in the general kernel the dbias writer warps
// when kDbiasWriterWarps (with or without a bias gradient: a count fixed at compile time).
template <typename Tr, bool kGeneral>
constexpr int kDsBarrierThreads = 128 * Tr::kConsumers + (kGeneral && kDbiasWriterWarps ? 64 : 0);

// dbias writer (general kernel): warps 2 and 3 of the producer warpgroup (without a bias gradient
// they only keep kBarDs's count).
// dbias = dS, which the consumers have already rounded to T and written to the dS^T buffer t & 1
// (the dQ product's operand) by the time they pass kBarDs of tile t; these warps pass it with them,
// read the tile back transposed and store it. Buffer t & 1 is written again at tile t + 2 (kDqInDs:
// at tile t + 1, the dQ staging), after the consumers' kBarDs of tile t + 1, which these warps reach
// only once they have read tile t.
// Thread x takes queries r = x, x + 64, .. of the tile and walks its keys 8 at a time: one 16-byte
// store of dbias (direct) or two 16-byte float reductions (the float accumulator of a broadcast
// dbias) where the keys are contiguous and the tile's keys all in range; element by element
// otherwise. A read: the warp's 32 queries of one key row, 64 bytes in 4 distinct 16-byte chunks
// of the swizzled row (no bank conflict). 24 registers here (setmaxnreg): keep it lean.
template <typename T, typename Tr>
__device__ __forceinline__ void write_dbias(typename Tr::Smem& sm, const BwdParams& p, const Sm90BwdWorkspace& ws,
                                            const BlockWork& w, int tile, int thread) {
  using namespace sm90;
  const Strided4& s = p.dbias_s;
  const bool direct = dbias_once(p);
  const bool vec = s.k == 1 && s.q % 8 == 0 && s.h % 8 == 0 && s.b % 8 == 0 &&
                   (!direct || (reinterpret_cast<uintptr_t>(p.dbias) & 15) == 0) && w.j0 + Tr::kBlockN <= p.n_k;
  for (int n = 0; n < w.n_iters; ++n) {
    const int t = tile + n;
    int hi, i0;
    w.at(n, Tr::kBlockM, hi, i0);
    // bar.sync is warp-aligned: lanes that left the query loop early (rows past n_q) rejoin first.
    __syncwarp();
    named_barrier_sync(kBarDs, kDsBarrierThreads<Tr, true>);  // dS^T of tile t in buffer t & 1
    if (!p.dbias) continue;  // only keeping the barrier's count
#pragma unroll 1
    for (int r = thread; r < Tr::kBlockM && i0 + r < p.n_q; r += 64) {
      // Key row 0 of query r: panel r / 64 (1024-byte aligned), chunk (r % 64) / 8, byte 2 (r % 8).
      // Key row j: + (j / 8) 1024, and row j % 8 of those 8 is XOR (j % 8) 0x90 (+ 128 (j % 8),
      // chunk XOR j % 8: the 128-byte swizzle; the bit fields do not overlap).
      const uint32_t x0 =
          (smem_addr(sm.ds[t & 1]) + (r / 64) * Tr::kBlockN * 128) | (((r % 64) / 8) << 4) | ((r % 8) << 1);
      const int64_t row = int64_t{w.bi} * s.b + int64_t{hi} * s.h + int64_t{i0 + r} * s.q + int64_t{w.j0} * s.k;
      if (vec) {
        // 8 keys at a time: one 16-byte store, or two 16-byte float reductions.
        T* const dst = static_cast<T*>(p.dbias) + row;
        float* const acc = ws.dbias_acc(p) + row;
#pragma unroll 1
        for (int g = 0; g < Tr::kBlockN / 8; ++g) {
          const uint32_t x = x0 + g * 1024;
          uint32_t v[4];  // keys 8 g + 2 m (low half), 8 g + 2 m + 1
#pragma unroll
          for (int m = 0; m < 4; ++m)
            v[m] = ld_shared_u16(x ^ (2 * m * 0x90)) | (ld_shared_u16(x ^ ((2 * m + 1) * 0x90)) << 16);
          if (direct) {
            *reinterpret_cast<uint4*>(dst + 8 * g) = make_uint4(v[0], v[1], v[2], v[3]);
          } else {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const float2 a = unpack2<T>(v[2 * h]), b = unpack2<T>(v[2 * h + 1]);
              red_add_v4_f32(acc + 8 * g + 4 * h, a.x, a.y, b.x, b.y);
            }
          }
        }
      } else {  // element by element (keys strided or broadcast, the last key block, misaligned)
#pragma unroll 1
        for (int j = 0; j < Tr::kBlockN; ++j) {
          const bool ok = w.j0 + j < p.n_k;
          const uint32_t bits = ld_shared_u16((x0 + (j / 8) * 1024) ^ ((j % 8) * 0x90));
          const int64_t o = ok ? row + j * s.k : 0;
          if (direct)
            st_b16_if(ok, static_cast<T*>(p.dbias) + o, static_cast<uint16_t>(bits));
          else
            red_add_f32_if(ok, ws.dbias_acc(p) + o, unpack2<T>(bits).x);
        }
      }
    }
  }
}

// dQ tile [64, 64] = dS[64 queries, kBlockN] K[kBlockN, 64 columns]; dS from the dS^T tile (MN-major
// A), K MN-major B. a_base / b_base: the panel of the warpgroup's rows / columns. Issue only.
template <typename T, typename Tr>
__device__ __forceinline__ void issue_dq(float (&acc)[8][4], uint32_t a_base, uint32_t b_base) {
  using namespace sm90;
  if constexpr (kDescriptorAdvance) {
    const uint64_t da = desc_mnmajor_sw128(a_base, Tr::kBlockN * 128);
    const uint64_t db = desc_mnmajor_sw128(b_base, Tr::kBlockN * 128);
#pragma unroll
    for (int kk = 0; kk < Tr::kBlockN / 16; ++kk)
      wgmma_ss_tt<T, 64>(acc, desc_advance(da, kk * 16 * 128), desc_advance(db, kk * 16 * 128), kk > 0);
  } else {
#pragma unroll
    for (int kk = 0; kk < Tr::kBlockN / 16; ++kk)
      wgmma_ss_tt<T, 64>(acc, desc_mnmajor_sw128(a_base + kk * 16 * 128, Tr::kBlockN * 128),
                         desc_mnmajor_sw128(b_base + kk * 16 * 128, Tr::kBlockN * 128), kk > 0);
  }
}

// General kernel, per tile: the bias^T / mask elements of this thread's key rows key0 + lane / 4
// (+ 8) and query columns i0 + 8 nt + 2 (lane % 4) (+ 1) (bias2[nt][h]: the T pair of the two
// queries, keep[h] bit 2 nt + e), fetched while the S^T / dP^T wgmmas run. Straight-line code:
// keys >= n_k and queries >= n_q (whose P^T is 0 by the key bound and lse2 = +inf) read element 0
// of the slice and are dropped by a select, so no per-element branch (and its reconvergence) is
// emitted (the forward's general kernel lost a quarter of its time to those, ncu).
template <typename T, int kNS>
__device__ __forceinline__ void load_extras_keyrows(TileExtras<kNS>& x, const BwdParams& p, const T* bias_bh,
                                                    const uint8_t* mask_bh, int key, int query, int n_k) {
  const int n_q = static_cast<int>(p.n_q);
  if (bias_bh) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int j = key + 8 * h;
      const T* bk = bias_bh + (j < n_k ? j : 0) * p.bias_s.k;
#pragma unroll
      for (int nt = 0; nt < kNS; ++nt) {
        const int i = query + 8 * nt;
        const bool ok0 = j < n_k && i < n_q, ok1 = j < n_k && i + 1 < n_q;
        const uint32_t lo = bits16(bk[(ok0 ? i : 0) * p.bias_s.q]);
        const uint32_t hi = bits16(bk[(ok1 ? i + 1 : 0) * p.bias_s.q]);
        x.bias2[nt][h] = (ok0 ? lo : 0u) | (ok1 ? hi << 16 : 0u);
      }
    }
  }
  if (mask_bh) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int j = key + 8 * h;
      x.keep[h] = mask_line_bits<kNS>(mask_bh + (j < n_k ? j : 0) * p.mask_s.k, p.mask_s.q, query, n_q, j < n_k);
    }
  }
}

// kStagedDkDv: dK (times scale) and dV of consumer warpgroup cw, [64 keys, kD] each, out through
// shared memory. Staging: the warpgroup's 64 key rows of every [kBlockN, 64] panel of both dS^T
// buffers (kChunks chunks of [64, 64] T, 8 KiB each; no other warpgroup touches them, and the
// caller has synchronized both warpgroups after their last dQ wgmma). A task is one 64-column
// panel of dK or dV; rounds of kChunks tasks. Written in fragment order (4-byte stores, 16-byte
// column chunk c of row r at chunk c ^ (r % 8): the 8 rows of a store hit distinct banks), read
// back as whole 16-byte chunks, stored to rows < n_k of dk / dv (16-byte aligned, checked by
// the caller).
template <typename T, typename Tr>
__device__ __forceinline__ void store_dkdv_staged(typename Tr::Smem& sm, const BwdParams& p, const BlockWork& w,
                                                  int cw, const float (&dk)[Tr::kD / 8][4],
                                                  const float (&dv)[Tr::kD / 8][4], float scale) {
  using namespace sm90;
  constexpr int kPanelsM = Tr::kBlockM / 64;  // [kBlockN, 64] panels per dS^T buffer
  constexpr int kChunks = 2 * kPanelsM;       // staging chunks of this warpgroup
  constexpr int kTasks = 2 * (Tr::kD / 64);   // (dK, dV) x column panels
  const int tid = threadIdx.x % 128, warp = tid / 32, lane = tid % 32;
  const int64_t row0 = (int64_t{w.bi} * p.h_kv + w.kvh) * p.n_k + w.j0 + 64 * cw;  // first key row
  const int64_t left = p.n_k - (w.j0 + 64 * cw);  // key rows of this warpgroup in range (may be <= 0)
  const int rows = left < 64 ? static_cast<int>(left) : 64;
  auto chunk = [&](int c) {
    return reinterpret_cast<unsigned char*>(sm.ds[c / kPanelsM]) + (c % kPanelsM) * Tr::kBlockN * 128 + 64 * cw * 128;
  };
#pragma unroll
  for (int r0 = 0; r0 < kTasks; r0 += kChunks) {
    named_barrier_sync(kBarEpiWg + cw, 128);  // the previous round's chunks are read
#pragma unroll
    for (int k = 0; k < kChunks && r0 + k < kTasks; ++k) {
      const int task = r0 + k, pc = task % (Tr::kD / 64);
      const bool is_dk = task < Tr::kD / 64;
      unsigned char* base = chunk(k);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = 16 * warp + lane / 4 + 8 * h;
#pragma unroll
        for (int c = 0; c < 8; ++c) {
          const int nt = 8 * pc + c;
          const uint32_t v = is_dk ? pack2<T>(dk[nt][2 * h] * scale, dk[nt][2 * h + 1] * scale)
                                   : pack2<T>(dv[nt][2 * h], dv[nt][2 * h + 1]);
          *reinterpret_cast<uint32_t*>(base + r * 128 + ((c ^ (r % 8)) << 4) + 4 * (lane % 4)) = v;
        }
      }
    }
    named_barrier_sync(kBarEpiWg + cw, 128);  // the round's chunks are written
#pragma unroll
    for (int k = 0; k < kChunks && r0 + k < kTasks; ++k) {
      const int task = r0 + k, pc = task % (Tr::kD / 64);
      T* dst = static_cast<T*>(task < Tr::kD / 64 ? p.dk : p.dv) + row0 * Tr::kD + 64 * pc;
      const unsigned char* base = chunk(k);
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // 64 rows x 8 chunks over 128 threads
        const int q = i * 128 + tid, r = q / 8, c = q % 8;
        if (r < rows)
          *reinterpret_cast<uint4*>(dst + int64_t{r} * Tr::kD + 8 * c) =
              *reinterpret_cast<const uint4*>(base + r * 128 + ((c ^ (r % 8)) << 4));
      }
    }
  }
  named_barrier_sync(kBarEpiWg + cw, 128);  // all read: the buffers may take dS^T again
}

// tile, kv: as for the producer (for_each_item). dK / dV start from zero per work item.
template <typename T, typename Tr, bool kPersistent, bool kGeneral, bool kKeyMask, bool kFull, bool kDropout>
__device__ __forceinline__ void consume(typename Tr::Smem& sm, typename Tr::Barriers& bar, const BwdParams& p,
                                        const Sm90BwdWorkspace& ws, const BlockWork& w, int cw, int tile, int kv) {
  using namespace sm90;
  constexpr int kNS = Tr::kBlockM / 8;   // 8-column groups of S^T / dP^T (queries)
  constexpr int kNO = Tr::kD / 8;        // 8-column groups of dK / dV
  constexpr int kKP = Tr::kBlockM / 16;  // k16 steps of dV / dK (queries)
  const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int key0 = w.j0 + 64 * cw + 16 * warp;  // this warp's first key
  const int shift = static_cast<int>(causal_shift(p));
  const int n_k = static_cast<int>(p.n_k);
  const bool causal = p.causal != Causal::kNone;
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;

  Dropout drop;  // the full general kernel and the dropout kernel (kDropout): dropout
  if constexpr ((kGeneral && kFull) || kDropout) drop.init(p);
  // kBwdDropoutBitsAhead: the keep bits of an iteration (bit 4 (nt % 8) + e of word nt / 8: element
  // e of n-tile nt), drawn during the iteration before.
  constexpr bool kBitsAhead = kDropout && kBwdDropoutBitsAhead && Tr::kD == 64;
  static_assert(kNS % 2 == 0, "keep bits come per n-tile pair");
  [[maybe_unused]] uint32_t keep_bits[kBitsAhead ? (kNS + 7) / 8 : 1];
  auto draw_keep = [&](int n) {
    if constexpr (kBitsAhead) {
      int hi, i0;
      w.at(n, Tr::kBlockM, hi, i0);
      const uint64_t bh = static_cast<uint64_t>(w.bi) * p.h + hi;
#pragma unroll
      for (int nt = 0; nt < kNS; nt += 2) {
        const uint32_t pair = dropout_bits_keyrows(drop, bh, key0, i0, nt) & 0xffu;
        keep_bits[nt / 8] = nt % 8 == 0 ? pair : keep_bits[nt / 8] | pair << (4 * (nt % 8));
      }
    }
  };
  if constexpr (kBitsAhead) {
    if (w.n_iters > 0) draw_keep(0);
  }
  float dk[kNO][4], dv[kNO][4];  // [64 keys of the warpgroup, kD], wgmma accumulator layout
  zero_acc(dk);
  zero_acc(dv);

  if (w.n_iters > 0) {
    const uint32_t k_wg = smem_addr(sm.k) + cw * 64 * 128;  // this warpgroup's 64 rows of every panel
    const uint32_t v_wg = smem_addr(sm.v) + cw * 64 * 128;
    // dQ split: rows (d = 64) or columns (d = 128) of the tile, one 64-panel each.
    const int dq_row0 = Tr::kDqSplitRows ? 64 * cw : 0;
    const int dq_col0 = Tr::kDqSplitRows ? 0 : 64 * cw;
    const uint32_t ds_panel = (dq_row0 / 64) * Tr::kBlockN * 128;
    const uint32_t k_panel = smem_addr(sm.k) + (dq_col0 / 64) * Tr::kBlockN * 128;
    mbarrier_wait(&bar.kv_full, kv & 1);  // phase kv: the block's K / V load number kv

    for (int n = 0; n < w.n_iters; ++n) {
      const int t = tile + n;  // ring position and dS^T buffer, counted across the block's items
      const int st = t % Tr::kStages;
      int hi, i0;
      w.at(n, Tr::kBlockM, hi, i0);
      // Key mask (constant along the queries, sm90_bwd_supported): this thread's two key rows
      // key0 + lane / 4 (+ 8), loaded while the ring stage fills. Masked keys get P^T = 0.
      bool key_off[2] = {false, false};
      if (kKeyMask && p.mask) {
        const uint8_t* km = p.mask + w.bi * p.mask_s.b + hi * p.mask_s.h;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int j = key0 + lane / 4 + 8 * h;
          key_off[h] = j < n_k && !km[j * p.mask_s.k];
        }
      }
      mbarrier_wait(&bar.full[st], (t / Tr::kStages) & 1);
      const uint32_t q_base = smem_addr(sm.q[st]), do_base = smem_addr(sm.dout[st]);

      // S^T and dP^T, two groups: the exponentials of S^T run while dP^T computes.
      float s[kNS][4], dp[kNS][4];
      wgmma_fence();
      sm90::gemm_ss_kmajor<T, Tr::kBlockM, Tr::kD, Tr::kBlockN, Tr::kBlockM>(s, k_wg, q_base);
      wgmma_commit_group();
      sm90::gemm_ss_kmajor<T, Tr::kBlockM, Tr::kD, Tr::kBlockN, Tr::kBlockM>(dp, v_wg, do_base);
      wgmma_commit_group();
      TileExtras<kNS> extras;
      if constexpr (kGeneral) {
        const T* bias_bh = p.bias ? static_cast<const T*>(p.bias) + w.bi * p.bias_s.b + hi * p.bias_s.h : nullptr;
        const uint8_t* mask_bh = kFull && p.mask ? p.mask + w.bi * p.mask_s.b + hi * p.mask_s.h : nullptr;
        load_extras_keyrows<T>(extras, p, Tr::kStageBias ? nullptr : bias_bh, mask_bh, key0 + lane / 4,
                               i0 + 2 * (lane % 4), n_k);
      }
      wgmma_wait_group<1>();
      fence_regs(s);

      // P^T = 2^(s scale log2e - lse2[query]); -inf past the causal diagonal (key - query > shift)
      // and for keys >= n_k (their K rows are zeros, but 2^(0 - lse2) could overflow fp16 and turn
      // dS K into inf x 0). Only warps whose 16 keys reach the diagonal or the key bound test.
      const bool check = (causal && key0 + 15 > i0 + shift) || key0 + 16 > n_k;
      const int diag = causal ? i0 + shift - key0 : (1 << 30);  // visible iff key row r - query col c <= diag
      const int key_limit = n_k - key0;                          // visible iff key row r < key_limit
      // General kernel: plus bias^T log2(e), and -inf where the mask hides the element (whatever
      // the bias holds); both compile away in the other kernels.
      // (kFull = false: a bias, no mask, no dropout, known at compile time.)
      const bool has_bias = kGeneral && (!kFull || p.bias != nullptr);
      const bool has_mask = kGeneral && kFull && p.mask != nullptr;
      const bool bias_bcast = p.bias_s.q == 0;
      uint32_t bias_t[4];  // kStageBias: bias^T of n-tiles nt, nt + 1 (even nt), as pairs of queries
      uint32_t bias_tile = 0;
      if constexpr (kGeneral && Tr::kStageBias) {
        if constexpr (Tr::kBiasInRing) {
          bias_tile = smem_addr(sm.bias[st]);
        } else {
          bias_tile = smem_addr(sm.bias[0]);
          if (has_bias) mbarrier_wait(&bar.bias_full, t & 1);  // phase t: this iteration's tile
        }
      }
#pragma unroll
      for (int nt = 0; nt < kNS; ++nt) {
        const int c = 8 * nt + 2 * (lane % 4);
        const float2 l2 = *reinterpret_cast<const float2*>(&sm.lse2[st][c]);
        if constexpr (kGeneral && Tr::kStageBias) {
          // The staged tile is [queries, keys] (panel cw: this warpgroup's keys, 128-byte swizzle);
          // ldmatrix .trans hands each thread key lane / 4 (+ 8 h) at queries 2 (lane % 4), + 1 of
          // an 8 x 8 block: the S^T fragment's pair. Matrix m (lanes 8 m ..): n-tile nt + m / 2,
          // keys 8 (2 warp + m % 2) ..; lane gives its query row (row 0 for a query-broadcast bias).
          if (has_bias && nt % 2 == 0) {
            const int q = bias_bcast ? 0 : 8 * (nt + lane / 16) + lane % 8;
            const int chunk = 2 * warp + (lane / 8) % 2;
            ldmatrix_x4_trans(bias_t, bias_tile + cw * Tr::kBlockM * 128 + q * 128 + ((chunk ^ (q % 8)) << 4));
          }
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float x = fmaf(s[nt][e], scale_log2, -(e % 2 ? l2.y : l2.x));
          if constexpr (kGeneral) {
            if (has_bias) {
              float b;
              if constexpr (Tr::kStageBias) {
                const float2 b2 = unpack2<T>(bias_t[2 * (nt % 2) + e / 2]);
                b = e % 2 ? b2.y : b2.x;
              } else {
                const float2 b2 = unpack2<T>(extras.bias2[nt][e / 2]);
                b = e % 2 ? b2.y : b2.x;
              }
              x = fmaf(b, kLog2e, x);
            }
          }
          const int r = frag_row(lane, e);
          if (check && (r - (c + e % 2) > diag || r >= key_limit)) x = -__int_as_float(0x7f800000);
          if constexpr (kGeneral) {
            if (has_mask) x = (extras.keep[e / 2] >> (2 * nt + e % 2)) & 1 ? x : -__int_as_float(0x7f800000);
          }
          s[nt][e] = ex2_approx(x);  // 2^-inf = 0 (masked, or lse2 = +inf)
        }
      }
      // kDqInDs: every thread's reads of the bias tile are done (ldmatrix is synchronous), so the
      // producer may load the next one.
      if constexpr (kGeneral && Tr::kDqInDs) {
        if (has_bias) mbarrier_arrive(&bar.bias_empty);
      }
      // Masked keys: P^T = 0 (outside the loop above: folded into it, the test cost the unmasked
      // backward ~25% on an H200; and in an instantiation of its own, kKeyMask, since even this
      // block cost the unmasked kernel ~3% there).
      if (kKeyMask && p.mask && (key_off[0] || key_off[1])) {
#pragma unroll
        for (int nt = 0; nt < kNS; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (key_off[e / 2]) s[nt][e] = 0.f;
      }
      uint32_t pa[kKP][4];   // P^T (dropout: P^T Z) as A fragments (16-bit)
      uint32_t dsa[kKP][4];  // dS^T as A fragments
      // Without dropout: P^T packed while dP^T computes, then dS^T = P^T (dP^T - D[query]).
      // ptxas puts the wait ahead of the exponentials above in the plain d = 128 kernels (so they
      // do not run beside dP^T). wgmma_wait_group_behind keeps it behind them, but the backward ran
      // 2-3% slower that way (H200 A/B, benchmarks/results/H200-ab-wait-behind.txt); at d = 64 it
      // made ptxas serialize the wgmmas (C7512).
      auto plain_ds = [&] {
#pragma unroll
        for (int kk = 0; kk < kKP; ++kk) acc_to_a<T>(pa[kk], s, kk);
        wgmma_wait_group<0>();
        fence_regs(dp);
#pragma unroll
        for (int nt = 0; nt < kNS; ++nt) {
          const int c = 8 * nt + 2 * (lane % 4);
          const float2 dd = *reinterpret_cast<const float2*>(&sm.dsum[st][c]);
#pragma unroll
          for (int e = 0; e < 4; ++e) dp[nt][e] = s[nt][e] * (dp[nt][e] - (e % 2 ? dd.y : dd.x));
        }
#pragma unroll
        for (int kk = 0; kk < kKP; ++kk) acc_to_a<T>(dsa[kk], dp, kk);
      };
      if (kDropout || (kGeneral && kFull && drop.on)) {
        // Z = keep / (1 - p) or 0 (the forward's Philox words): dV takes (P^T Z) dO and
        // dS^T = P^T (dP^T Z - D). Both need P^T whole, so dP^T is waited for first.
        const uint64_t bh = static_cast<uint64_t>(w.bi) * p.h + hi;
        wgmma_wait_group<0>();
        fence_regs(dp);
        uint32_t keep_pair = 0;
#pragma unroll
        for (int nt = 0; nt < kNS; ++nt) {
          if (!kBitsAhead && nt % 2 == 0) keep_pair = dropout_bits_keyrows(drop, bh, key0, i0, nt);
          const uint32_t keep = kBitsAhead ? keep_bits[nt / 8] >> (4 * (nt % 8)) : keep_pair >> (4 * (nt % 2));
          const int c = 8 * nt + 2 * (lane % 4);
          const float2 dd = *reinterpret_cast<const float2*>(&sm.dsum[st][c]);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float z = (keep >> e) & 1 ? drop.keep_scale : 0.f;
            dp[nt][e] = s[nt][e] * (dp[nt][e] * z - (e % 2 ? dd.y : dd.x));
            s[nt][e] *= z;
          }
        }
#pragma unroll
        for (int kk = 0; kk < kKP; ++kk) {
          acc_to_a<T>(pa[kk], s, kk);
          acc_to_a<T>(dsa[kk], dp, kk);
        }
      } else {
        plain_ds();
      }
      // dbias += dS (element (query i, key j) of this tile; the scores' gradient, unscaled): with
      // kDbiasWriterWarps the writer warps store it from the dS^T buffer; else here, one loop per
      // destination kind, a predicated store per element (no per-element branch).
      if constexpr (kGeneral && !kDbiasWriterWarps) {
        if (p.dbias) {
          const Strided4& ds = p.dbias_s;
          const int64_t base = w.bi * ds.b + hi * ds.h;
          const int n_q = static_cast<int>(p.n_q);
          auto for_each = [&](auto&& op) {
#pragma unroll
            for (int nt = 0; nt < kNS; ++nt)
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                const int i = i0 + frag_col(lane, nt, e), j = key0 + frag_row(lane, e);
                op(i < n_q && j < n_k, base + i * ds.q + j * ds.k, dp[nt][e]);
              }
          };
          // The accumulator: atomics where blocks share an element; where one thread walks a GQA
          // group's heads, its own reductions to one address apply in program order.
          if (dbias_once(p)) {
            for_each([&](bool ok, int64_t off, float g) {
              st_b16_if(ok, static_cast<T*>(p.dbias) + off, static_cast<uint16_t>(bits16(from_acc<T>(g))));
            });
          } else {
            float* const acc = ws.dbias_acc(p);
            for_each([&](bool ok, int64_t off, float g) { red_add_f32_if(ok, acc + off, g); });
          }
        }
      }

      // dS^T -> shared memory buffer t & 1 ([kBlockN keys, kBlockM queries], 64-query panels).
      // Fragment reg r of step kk: key row 16 warp + lane / 4 + 8 (r % 2), query 16 kk + 8 (r / 2) + 2 (lane % 4).
      // kDqInDs: the buffer held iteration t - 1's dQ staging tile; the writer has read it.
      if constexpr (Tr::kDqInDs) named_barrier_sync(kBarDqEmpty, Tr::kDqSyncThreads);
      {
        unsigned char* ds = reinterpret_cast<unsigned char*>(sm.ds[t & 1]);
#pragma unroll
        for (int kk = 0; kk < kKP; ++kk)
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const int row = 64 * cw + 16 * warp + lane / 4 + 8 * (r % 2);
            const int col = 16 * kk + 8 * (r / 2) + 2 * (lane % 4);
            *reinterpret_cast<uint32_t*>(ds + sw128_offset(row, col, Tr::kBlockN)) = dsa[kk][r];
          }
      }
      fence_proxy_async();  // generic-proxy stores -> wgmma (async proxy) reads
      // Both warpgroups' halves written. Also: each warpgroup passed its previous tile's
      // wait_group<0> (dQ read buffer (t - 1) & 1) before arriving, so buffer t & 1, last read at
      // tile t - 2, is free by the time anyone writes it again at tile t + 2 (t runs on across
      // items, so this holds at item boundaries too).
      // In the general kernel the dbias writer warps pass it too (write_dbias), once they have
      // read the previous tile's buffer.
      float dq[8][4];  // [64, 64] dQ tile of this warpgroup
      if constexpr (kSplitDsBarrier && !kGeneral) {
        // The same ordering in two halves: the barrier of (warpgroup, tile parity) completes with
        // the writer's arrival and the reader's wait. A warpgroup's next arrival on it (tile t + 2)
        // comes after its own wait at tile t + 1, i.e. after the other warpgroup arrived there and
        // so finished tile t, including its wait here: no arrival is counted into a stale round.
        static_assert(Tr::kConsumers == 2 && kBarDsHalf + 3 < 16, "split dS^T barrier: two warpgroups");
        named_barrier_arrive(kBarDsHalf + 2 * cw + (t & 1), 256);
        wgmma_fence();
        sm90::gemm_rs_mnmajor<T, Tr::kD, Tr::kBlockM, Tr::kBlockM>(dv, pa, do_base);  // dV += P^T dO
        wgmma_commit_group();
        named_barrier_sync(kBarDsHalf + 2 * (1 - cw) + (t & 1), 256);
        wgmma_fence();
        issue_dq<T, Tr>(dq, smem_addr(sm.ds[t & 1]) + ds_panel, k_panel);
        wgmma_commit_group();
        sm90::gemm_rs_mnmajor<T, Tr::kD, Tr::kBlockM, Tr::kBlockM>(dk, dsa, q_base);  // dK += dS^T Q
        wgmma_commit_group();
        wgmma_wait_group<1>();  // dV, dQ done; dK still running
      } else {
        named_barrier_sync(kBarDs, kDsBarrierThreads<Tr, kGeneral>);
        wgmma_fence();
        issue_dq<T, Tr>(dq, smem_addr(sm.ds[t & 1]) + ds_panel, k_panel);
        wgmma_commit_group();
        sm90::gemm_rs_mnmajor<T, Tr::kD, Tr::kBlockM, Tr::kBlockM>(dv, pa, do_base);  // dV += P^T dO
        sm90::gemm_rs_mnmajor<T, Tr::kD, Tr::kBlockM, Tr::kBlockM>(dk, dsa, q_base);  // dK += dS^T Q
        wgmma_commit_group();
        wgmma_wait_group<1>();  // dQ done; dK / dV still running
      }
      fence_regs(dq);
      // dQ tile -> the staging buffer in fragment order (float4 nt of consumer thread t at [nt][t]:
      // conflict-free 16-byte stores), the order of its block in dq_acc too; the dQ writer warp adds
      // the whole tile with one bulk reduction while dK / dV compute.
      // The writer has read the previous tile (kDqInDs: synced above, before the dS^T stores; this
      // buffer, (t + 1) & 1, held dS^T of tile t - 1, which both warpgroups' dQ wgmmas have read by
      // kBarDs of tile t, and the staging of tile t - 2, read before that sync of tile t - 1).
      if constexpr (!Tr::kDqInDs) named_barrier_sync(kBarDqEmpty, Tr::kDqSyncThreads);
      {
        float4* stage = reinterpret_cast<float4*>(Tr::dq_stage(sm, t)) + 128 * cw + threadIdx.x % 128;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
          stage[nt * 128 * Tr::kConsumers] = make_float4(dq[nt][0], dq[nt][1], dq[nt][2], dq[nt][3]);
      }
      fence_proxy_async();  // generic-proxy stores -> the bulk reduction (async proxy) reads
      named_barrier_arrive(kBarDqFull, Tr::kDqSyncThreads);
      if constexpr (kBitsAhead) {
        if (n + 1 < w.n_iters) draw_keep(n + 1);  // beside the dK / dV wgmmas
      }
      wgmma_wait_group<0>();
      fence_regs(dk);
      fence_regs(dv);
      fence_regs(pa);
      fence_regs(dsa);
      // Q, dO, lse2, D of this stage consumed. Every thread arrives: each releases its own reads of
      // lse2 / D (one arrival per warp would order only lane 0's reads before the next bulk copy).
      mbarrier_arrive(&bar.empty[st]);
    }
    // This thread's wgmma reads of K / V are over (the last wait_group<0>): the producer may load
    // the next item's while this one's dK / dV are stored.
    if constexpr (kPersistent) mbarrier_arrive(&bar.kv_empty);
  }

  // kDqInDs: the writer has read the last dQ staging tile (dS^T buffer n_iters & 1), which the
  // staged epilogue overwrites; synced on every path, to match the writer's last arrival.
  if constexpr (Tr::kDqInDs) {
    if (w.n_iters > 0) named_barrier_sync(kBarDqEmpty, Tr::kDqSyncThreads);
  }
  // dK = scale dS^T Q, dV: rows key0 + lane / 4 (+ 8), dk / dv contiguous [b, h_kv, n_k, d].
  const float scale = static_cast<float>(p.scale);
  // Not in the persistent kernel (d = 64: 3-9% slower there, its plain stores overlap the next
  // item's start), nor with the dbias writer warps (they may still read the last dS^T buffer).
  if constexpr (kStagedDkDv && !kPersistent && !(kGeneral && kDbiasWriterWarps)) {
    if (((reinterpret_cast<uintptr_t>(p.dk) | reinterpret_cast<uintptr_t>(p.dv)) & 15) == 0) {
      // Both warpgroups' last dQ wgmma (reading all of dS^T) is done before either stages over it.
      named_barrier_sync(kBarEpi, 128 * Tr::kConsumers);
      store_dkdv_staged<T, Tr>(sm, p, w, cw, dk, dv, scale);
      return;
    }
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t j = key0 + lane / 4 + 8 * h;
    if (j >= p.n_k) continue;
    const int64_t off = ((int64_t{w.bi} * p.h_kv + w.kvh) * p.n_k + j) * Tr::kD + 2 * (lane % 4);
    T* dkg = static_cast<T*>(p.dk) + off;
    T* dvg = static_cast<T*>(p.dv) + off;
#pragma unroll
    for (int nt = 0; nt < kNO; ++nt) {
      *reinterpret_cast<uint32_t*>(dkg + 8 * nt) = pack2<T>(dk[nt][2 * h] * scale, dk[nt][2 * h + 1] * scale);
      *reinterpret_cast<uint32_t*>(dvg + 8 * nt) = pack2<T>(dv[nt][2 * h], dv[nt][2 * h + 1]);
    }
  }
}

// kPersistent: the persistent grid; kGeneral: bias / dbias / any mask / dropout (kSm90BwdGeneral);
// kKeyMask: a key mask may be present (p.mask; without either flag the kernel ignores it);
// kFull (general kernel): masks and dropout too, else a bias alone (kBwdBiasOnly), or a bias with a
// key mask when kKeyMask is set as well (kBwdBiasKeyMask); kDropout (plain kernel): dropout, always
// on (kBwdDropoutPlain).
template <typename T, typename Tr, bool kPersistent, bool kGeneral, bool kKeyMask, bool kFull = true,
          bool kDropout = false>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    sm90_bwd_kernel(const __grid_constant__ CUtensorMap tm_q,   // [b, h, n_q, d] box [kBlockM, 64]
                    const __grid_constant__ CUtensorMap tm_k,   // [b, h_kv, n_k, d] box [kBlockN, 64]
                    const __grid_constant__ CUtensorMap tm_v,   // [b, h_kv, n_k, d] box [kBlockN, 64]
                    const __grid_constant__ CUtensorMap tm_do,  // [b, h, n_q, d] box [kBlockM, 64]
                    const __grid_constant__ CUtensorMap tm_bias,  // kStageBias: [b, h, n_q, n_k] box [kBlockM, 64]
                    const BwdParams p, const Sm90BwdWorkspace ws,
                    const __grid_constant__ ItemGrid grid) {  // sizes (persistent), band
#if FLASH_MHA_SM90_ENABLED
  using namespace sm90;
  // Static shared memory exists only in the sm_90a body (the host checks it, as sm90_fwd.cu).
  __shared__ typename Tr::Barriers bar;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t base = smem_addr(smem_raw);
  auto& sm = *reinterpret_cast<typename Tr::Smem*>(smem_raw + (((base + 1023) & ~1023u) - base));

  // The one-item kernel's work (the persistent kernel recomputes it per item).
  const BlockWork first(p, nullptr, grid.band, blockIdx.x, Tr::kBlockM, Tr::kBlockN, kGeneral);
  const int wg = threadIdx.x / 128;
  if (threadIdx.x == 0) {
    mbarrier_init(&bar.kv_full, 1);
    if constexpr (kPersistent) mbarrier_init(&bar.kv_empty, 128 * Tr::kConsumers);  // every consumer thread
    for (int s = 0; s < Tr::kStages; ++s) {
      mbarrier_init(&bar.full[s], 1);
      mbarrier_init(&bar.empty[s], 128 * Tr::kConsumers);  // one arrival per consumer thread
    }
    if constexpr (Tr::kDqInDs) {
      mbarrier_init(&bar.bias_full, 1);
      mbarrier_init(&bar.bias_empty, 128 * Tr::kConsumers);
    }
    fence_barrier_init();
  }
  __syncthreads();

  if (wg == 0) {
    setmaxnreg_dec<Tr::kProducerRegs>();
    if (threadIdx.x == 0) {
      tma_prefetch_desc(&tm_q);
      tma_prefetch_desc(&tm_k);
      tma_prefetch_desc(&tm_v);
      tma_prefetch_desc(&tm_do);
      for_each_item<kPersistent>(p, grid, first, Tr::kBlockM, Tr::kBlockN, [&](const BlockWork& w, int tile, int kv) {
        produce<T, Tr, kPersistent>(sm, bar, p, ws, w, tile, kv, &tm_q, &tm_k, &tm_v, &tm_do, &tm_bias);
      });
    } else if (threadIdx.x / 32 == 1) {
      for_each_item<kPersistent>(p, grid, first, Tr::kBlockM, Tr::kBlockN,
                                 [&](const BlockWork& w, int tile, int) { write_dq<Tr, kPersistent>(sm, p, ws, w, tile); });
      if (kPersistent && threadIdx.x % 32 == 0) bulk_wait_group<0>();
    } else if constexpr (kGeneral && kDbiasWriterWarps) {
      if (threadIdx.x >= 64) {  // warps 2, 3: the dbias writers (on kBarDs even without a dbias)
        for_each_item<kPersistent>(p, grid, first, Tr::kBlockM, Tr::kBlockN, [&](const BlockWork& w, int tile, int) {
          write_dbias<T, Tr>(sm, p, ws, w, tile, threadIdx.x - 64);
        });
      }
    }
  } else {
    setmaxnreg_inc<Tr::kConsumerRegs>();
    for_each_item<kPersistent>(p, grid, first, Tr::kBlockM, Tr::kBlockN, [&](const BlockWork& w, int tile, int kv) {
      consume<T, Tr, kPersistent, kGeneral, kKeyMask, kFull, kDropout>(sm, bar, p, ws, w, wg - 1, tile, kv);
    });
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// Host side

// Returns false (nothing launched) when a tensor map cannot be built. persistent_ctas: see
// sm90_bwd_variant.
template <typename T, int kD>
bool launch(const BwdParams& p_in, void* workspace, cudaStream_t stream, int persistent_ctas) {
  using Tr = Sm90BwdTraits<T, kD>;
  const Sm90BwdWorkspace ws(p_in, workspace);
  // Deterministic mode with a dbias that blocks share: the kernels store dS whole into dbias_full
  // (a dbias stored once, no atomics), summed into dbias by the reduce kernel at the end.
  BwdParams p = p_in;
  if (Sm90BwdWorkspace::materialized_dbias(p_in)) {
    p.dbias = ws.dbias_full;
    p.dbias_s = Strided4{p.h * p.n_q * p.n_k, p.n_q * p.n_k, p.n_k, 1};
  }
  using TrG = Sm90BwdTraits<T, kD, true>;  // the general kernel's (bias ring at d = 128)
  CUtensorMap tq, tk, tv, tdo, tb{};
  if (!make_map(&tq, p.dtype, p.q, p.b, p.h, p.n_q, p.d, p.q_sb, p.q_sh, p.q_sn, Tr::kBlockM) ||
      !make_map(&tk, p.dtype, p.k, p.b, p.h_kv, p.n_k, p.d, p.k_sb, p.k_sh, p.k_sn, Tr::kBlockN) ||
      !make_map(&tv, p.dtype, p.v, p.b, p.h_kv, p.n_k, p.d_v, p.v_sb, p.v_sh, p.v_sn, Tr::kBlockN) ||
      !make_map(&tdo, p.dtype, p.dout, p.b, p.h, p.n_q, p.d_v, p.do_sb, p.do_sh, p.do_sn, Tr::kBlockM))
    return false;
  const bool dropout_plain = kBwdDropoutPlain && dropout_alone(p) && !p.dbias;
  const bool general = kSm90BwdGeneral && needs_general(p) && !dropout_plain;
  if (general && TrG::kStageBias && p.bias) {  // broadcast dims (stride 0) have size 1
    const Strided4& s = p.bias_s;
    if (!make_map(&tb, p.dtype, p.bias, s.b ? p.b : 1, s.h ? p.h : 1, s.q ? p.n_q : 1, p.n_k, s.b, s.h, s.q,
                  TrG::kBlockM))
      return false;
  }
  // General kernel, a dbias stored directly: causal tiles no iteration visits must read 0 (without
  // causality every element in range is stored); else its float accumulator starts from 0 (the
  // prep kernel zeroes dq_acc, and writes lse2 / D).
  if (kSm90BwdGeneral && p.dbias && dbias_once(p) && p.causal != Causal::kNone)
    cudaMemsetAsync(p.dbias, 0, static_cast<size_t>(p.b * p.h * p.n_q * p.n_k) * sizeof(T), stream);
  if (kSm90BwdGeneral && p.dbias && !dbias_once(p))
    cudaMemsetAsync(ws.dbias_acc(p), 0, static_cast<size_t>(dbias_elems(p)) * 4, stream);
  const int64_t rows = p.b * p.h * ws.n_q_pad;
  if (rows > 0) {
    const bool vec = aligned16(p.o) && aligned16(p.dout) && p.o_sb % 8 == 0 && p.o_sh % 8 == 0 && p.o_sn % 8 == 0 &&
                     p.do_sb % 8 == 0 && p.do_sh % 8 == 0 && p.do_sn % 8 == 0;
    const int64_t threads = rows * (p.d_v / 8);
    sm90_bwd_prep_kernel<T>
        <<<static_cast<unsigned>(std::min<int64_t>(ceil_div(threads, 256), 1 << 20)), 256, 0, stream>>>(p, ws, vec);
  }
  const int64_t blocks = p.b * p.h_kv * ceil_div(p.n_k, Tr::kBlockN);  // work items
  const ItemGrid grid(p, Tr::kBlockM, Tr::kBlockN);
  if (blocks > 0) {
    auto run = [&](auto kernel, int64_t n_blocks, int64_t smem_bytes) {
      allow_smem(kernel, smem_bytes);
      kernel<<<static_cast<unsigned>(n_blocks), Tr::kThreads, smem_bytes, stream>>>(tq, tk, tv, tdo, tb, p, ws, grid);
    };
    const int64_t ctas = std::min<int64_t>(blocks, std::min(sm_count(), persistent_ctas));
    if (general) {  // one block per item
      if constexpr (kSm90BwdGeneral) {
        const bool bias_alone = kBwdBiasOnly && p.bias && p.dropout_p == 0.0;
        const bool key_mask = p.mask && (p.mask_s.q == 0 || p.n_q == 1);
        auto run_bias_key_mask = [&] {  // instantiated only with the flag on
          if constexpr (kBwdBiasKeyMask)
            run(sm90_bwd_kernel<T, TrG, false, true, true, false>, blocks, TrG::kSmemBytes);
        };
        if (bias_alone && !p.mask)
          run(sm90_bwd_kernel<T, TrG, false, true, false, false>, blocks, TrG::kSmemBytes);
        else if (kBwdBiasKeyMask && bias_alone && key_mask)
          run_bias_key_mask();
        else
          run(sm90_bwd_kernel<T, TrG, false, true, false>, blocks, TrG::kSmemBytes);
      }
    } else if (dropout_plain) {  // instantiated only with the flag on; a key mask or none
      if constexpr (kBwdDropoutPlain)
        run(sm90_bwd_kernel<T, Tr, false, false, true, true, true>, blocks, Tr::kSmemBytes);
    } else if (persistent_ctas > 0) {
      run(p.mask ? sm90_bwd_kernel<T, Tr, true, false, true> : sm90_bwd_kernel<T, Tr, true, false, false>, ctas,
          Tr::kSmemBytes);
    } else {
      run(p.mask ? sm90_bwd_kernel<T, Tr, false, false, true> : sm90_bwd_kernel<T, Tr, false, false, false>, blocks,
          Tr::kSmemBytes);
    }
  }
  const int64_t dq_tiles = p.b * p.h * ws.n_qt;
  if (p.b * p.h * p.n_q > 0)
    sm90_bwd_convert_kernel<T, Tr><<<static_cast<unsigned>(std::min<int64_t>(dq_tiles, 1 << 20)), 256, 0, stream>>>(
        p, ws, aligned16(p.dq));
  if constexpr (kSm90BwdGeneral) {
    if (p.dbias && !dbias_once(p)) {  // the float accumulator -> dbias
      const int64_t n = dbias_elems(p);
      to_dtype_kernel<T><<<static_cast<unsigned>(std::min<int64_t>(ceil_div(n, 256), 65536)), 256, 0, stream>>>(
          static_cast<T*>(p.dbias), ws.dbias_acc(p), n);
    }
    if (Sm90BwdWorkspace::materialized_dbias(p_in)) {
      const int64_t n = dbias_elems(p_in);
      sm90_bwd_dbias_reduce_kernel<T><<<static_cast<unsigned>(std::min<int64_t>(ceil_div(n, 256), 65536)), 256, 0,
                                        stream>>>(p_in, static_cast<const T*>(ws.dbias_full));
    }
  }
  return true;
}

template <typename T>
bool dispatch_dim(const BwdParams& p, void* workspace, cudaStream_t stream, int persistent_ctas) {
  if (p.d == 64) return launch<T, 64>(p, workspace, stream, persistent_ctas);
  return launch<T, 128>(p, workspace, stream, persistent_ctas);
}


// Whether this binary holds the sm_90a body of the kernels (asked once, of one configuration).
bool kernel_compiled_for_sm90a() {
  using Tr = Sm90BwdTraits<__nv_bfloat16, 64>;
  static const bool ok = has_sm90a_body(sm90_bwd_kernel<__nv_bfloat16, Tr, false, false, false>);
  return ok;
}

}  // namespace

// float16 / bfloat16, d == d_v in {64, 128}, no bias / dropout / dbias and no mask or a key mask
// (constant along the queries) unless kSm90BwdGeneral; in deterministic mode a dbias that blocks
// share not broadcast over the keys and at most kMaxDbiasFullBytes when stored whole,
// TMA-describable q / k / v / dout (16-byte aligned bases, strides multiples of 8 elements),
// o readable (any strides), sizes within 32-bit tile indices.
bool sm90_bwd_supported(const BwdParams& p) {
  if (p.dtype != Dtype::kFloat16 && p.dtype != Dtype::kBFloat16) return false;
  // Deterministic mode, a dbias that blocks share: stored whole in T, then summed. Not when it is
  // broadcast over the keys (its sums cancel to ~0: the T-rounded terms would leave their rounding
  // noise; SIMT sums float terms), nor past kMaxDbiasFullBytes.
  if (Sm90BwdWorkspace::materialized_dbias(p) &&
      (!kSm90BwdGeneral || (p.dbias_s.k == 0 && p.n_k > 1) ||
       Sm90BwdWorkspace::dbias_full_bytes(p) > Sm90BwdWorkspace::kMaxDbiasFullBytes))
    return false;
  if (p.d != p.d_v || (p.d != 64 && p.d != 128)) return false;
  if (!kSm90BwdGeneral && needs_general(p)) return false;  // else a key mask at most
  // d = 64 with a bias gradient: without kBwdStageBiasD64's staged tiles the sm80 backward is faster
  // (H200, bf16, 4k: full bias 12.4 vs 16.4 ms, head-broadcast 15.7 vs 17.2; 1k: 3.3 vs 4.3, 3.9 vs
  // 4.0); with them this one (kBwdDbiasD64). Deterministic mode stays here either way.
  if (p.d == 64 && p.dbias && !p.deterministic && !kBwdDbiasD64) return false;
  // d = 128 (and d = 64 with kBwdStageBiasD64) stages the bias tiles by TMA.
  if ((p.d == 128 || kBwdStageBiasD64) && p.bias && !bias_tma_ok(p)) return false;
  if (p.h_kv <= 0 || p.h % p.h_kv) return false;
  constexpr int64_t kMaxCoord = (int64_t{1} << 30);
  if (p.n_q > kMaxCoord || p.n_k > kMaxCoord || p.b * p.h > kMaxCoord / 2 ||
      p.b * p.h_kv * ceil_div(p.n_k, 128) >= (int64_t{1} << 31))
    return false;
  const int64_t strides[] = {p.q_sb, p.q_sh, p.q_sn, p.k_sb, p.k_sh, p.k_sn,
                             p.v_sb, p.v_sh, p.v_sn, p.do_sb, p.do_sh, p.do_sn};
  for (int64_t s : strides)
    if (s % 8 || s < 0 || s >= (int64_t{1} << 38)) return false;
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v) || !aligned16(p.dout)) return false;
  // dq / dk / dv get 4-byte stores (contiguous outputs, even d): need 4-byte aligned bases.
  if ((reinterpret_cast<uintptr_t>(p.dq) & 3) || (reinterpret_cast<uintptr_t>(p.dk) & 3) ||
      (reinterpret_cast<uintptr_t>(p.dv) & 3))
    return false;
  return encode_tiled() != nullptr && kernel_compiled_for_sm90a();
}

int64_t sm90_bwd_workspace_bytes(const BwdParams& p) { return Sm90BwdWorkspace(p, nullptr).bytes; }

void sm90_bwd_variant(const BwdParams& p, void* workspace, cudaStream_t stream, int persistent_ctas) {
  // Deterministic mode: one block per item. Its key blocks wait for lower ones (write_dq); the
  // persistent grid ties items to blocks in advance, so one block that finds no free SM (another
  // stream's kernel) would stall the resident ones for good.
  if (p.deterministic) persistent_ctas = 0;
  const bool launched = p.dtype == Dtype::kFloat16
                            ? dispatch_dim<__half>(p, workspace, stream, persistent_ctas)
                            : dispatch_dim<__nv_bfloat16>(p, workspace, stream, persistent_ctas);
  // A view TMA cannot describe (e.g. overlapping strides): the sm80 backward (or the SIMT one where
  // sm80 does not take the call: deterministic mode with a shared dbias), on the same workspace
  // (dispatch.cu sizes it for both), zeroed first as those need. Nothing was launched yet.
  if (!launched) {
    const bool sm80 = sm80_bwd_supported(p);
    const int64_t bytes = sm80 ? sm80_bwd_workspace_bytes(p) : simt_bwd_workspace_bytes(p);
    cudaMemsetAsync(workspace, 0, static_cast<size_t>(bytes), stream);
    if (sm80)
      sm80_bwd(p, workspace, stream);
    else
      simt_bwd(p, workspace, stream);
  }
}

void sm90_bwd(const BwdParams& p, void* workspace, cudaStream_t stream) {
  sm90_bwd_variant(p, workspace, stream, use_persistent(p) ? sm_count() : 0);
}

}  // namespace flash_mha::cuda
