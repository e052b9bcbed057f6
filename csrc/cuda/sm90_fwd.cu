// Hopper forward for float16 / bfloat16 (sm_90a): TMA + mbarrier + wgmma + warp specialization.
//
// A block is one producer warpgroup and kConsumers (2 for d = 128, 2 or 3 for d = 64: see
// dispatch_dim) consumer warpgroups of 64 query rows each, so a query tile is kBlockM = 64
// kConsumers rows:
//   warpgroup 0 (producer, registers given back with setmaxnreg): one thread issues the TMA loads,
//     Q once per query tile, then K and V tiles of kBlockN keys into rings (kKStages, kVStages) of
//     shared-memory stages. Each stage has four mbarriers: k_full / v_full (the TMA's byte count
//     completes them) and k_empty / v_empty (one arrival per consumer warp once its wgmma reading
//     the stage retired); Q has q_full / q_empty per buffer (kQBufs: 1, or 2 with
//     kQDoubleBuffer).
//   consumers: S = Q K^T with wgmma (both operands in shared memory), masking (causal, key bound,
//     and a key mask: a bool mask constant along the queries, read per key tile while the S wgmma
//     runs; the general instantiation, kSm90FwdGeneral, also a bias, any mask and dropout) and
//     online softmax in registers (log2 domain, scale folded into the exponent), P converted to
//     16 bits in registers and O += P V with wgmma (A = P from registers, B = V from shared memory
//     read "MN-major": V is [keys, d] with d contiguous, the transpose bit set).
// Intra-warpgroup overlap: the S wgmma of key tile t and the P V wgmma of tile t - 1 are in flight
//   together, and the softmax of tile t runs while P V of tile t - 1 computes. Across query tiles
//   the same: a tile's last P V goes out with the next tile's first S, and the finished tile's
//   output is stored while that S computes (ConsumerState).
// Ping-pong (template flag): the consumer warpgroups take turns (named barriers) issuing their
//   GEMMs, so one warpgroup's softmax runs while the others' GEMMs keep the tensor cores busy.
// Persistent grid (template flag): one block per SM walks a static list of work units (a query
//   tile; for causal problems a pair of query tiles of equal total cost), so loads for the next
//   tile overlap the end of the current one.
// The configuration per head dim is chosen in dispatch_dim (measurements: NOTES.md).
//
// Shared-memory tiles are [rows, d] stored as d / 64 "panels" of [rows, 64] with the 128-byte
// swizzle that TMA writes and wgmma reads (sm90.cuh explains the descriptors).
// Key tiles are visited from the last to the first, so the tiles that need element masks (the
// key bound n_k, the causal diagonal) come first; causal tiles wholly above the diagonal are never
// loaded.
//
// Output: O / l written from registers (16-byte stores after a quad transpose), lse = (m + log2 l)
// ln 2 in natural log of the scaled scores; a row that sees no key gets zeros and lse = +inf (as
// sm80_fwd.cu).
#include <cuda.h>          // CUtensorMap and its enums (types only: nothing links libcuda)
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

// Unreferenced traits members are expected: the sm_80 pass compiles the kernel body out, and some
// configurations leave a member unused (kSchedBarrier without ping-pong).
#pragma nv_diag_suppress 177

#include "kernels.h"
#include "sm80_tile.cuh"
#include "sm90.cuh"
#include "sm90_fwd_work.cuh"  // configuration flags, traits, work list, pipeline state
#include "sm90_host.h"
#include "softmax.cuh"

namespace flash_mha::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Producer: one thread. For each query tile: per key tile (last first) its K and V, and in the
// general kernel its bias tile; Q once, after the first K and V (which need only free ring stages,
// while Q waits for the consumers to release the previous tile's Q: that wait ends when the
// previous tile's last S is done, so its first K / V are on their way by then). next: the query
// tile after this one (or nullptr), whose Q is prefetched into L2 now, so that its load at the
// tile boundary, where the consumers wait for it, is an L2 hit.
template <typename T, typename Tr>
__device__ __forceinline__ void produce_tile(typename Tr::Smem& sm, typename Tr::Barriers& bar,
                                             const CUtensorMap* tm_q, const CUtensorMap* tm_k,
                                             const CUtensorMap* tm_v, const CUtensorMap* tm_bias, const FwdParams& p,
                                             const TileCoord& c, const TileCoord* next, PipeState& ps) {
  using namespace sm90;
  if (next && next->n_tiles > 0) {
#pragma unroll
    for (int pn = 0; pn < Tr::kPanels; ++pn) tma_prefetch_l2_4d(tm_q, pn * Tr::kPanel, next->i0, next->hi, next->bi);
  }
  if (c.n_tiles == 0) return;
  const int bi = c.bi, hi = c.hi, kvh = c.kvh;
  auto load_q = [&] {
    const int qb = static_cast<int>(ps.q_it % Tr::kQBufs);
    mbarrier_wait(&bar.q_empty[qb], ((ps.q_it / Tr::kQBufs) & 1) ^ 1);
    mbarrier_arrive_expect_tx(&bar.q_full[qb], Tr::kQBytes);
#pragma unroll
    for (int pn = 0; pn < Tr::kPanels; ++pn)
      tma_load_4d(sm.q[qb] + pn * Tr::kBlockM * Tr::kPanel, tm_q, &bar.q_full[qb], pn * Tr::kPanel, c.i0, hi, bi);
    ++ps.q_it;
  };
  auto load_k = [&](int t, uint32_t use) {  // K (and the bias tile) of key tile t
    const int st = static_cast<int>(use % Tr::kKStages);
    const int j0 = (c.n_tiles - 1 - t) * Tr::kBlockN;
    mbarrier_wait(&bar.k_empty[st], ((use / Tr::kKStages) & 1) ^ 1);
    mbarrier_arrive_expect_tx(&bar.k_full[st], Tr::kKVBytes);
#pragma unroll
    for (int pn = 0; pn < Tr::kPanels; ++pn)
      tma_load_4d(sm.k[st] + pn * Tr::kBlockN * Tr::kPanel, tm_k, &bar.k_full[st], pn * Tr::kPanel, j0, kvh, bi);
    if constexpr (Tr::kGeneral) {
      if (p.bias) {
        // Broadcast dims have size 1 in the map: coordinate 0 there.
        const int bst = use % Tr::kBiasStages;
        mbarrier_wait(&bar.bias_empty[bst], ((use / Tr::kBiasStages) & 1) ^ 1);
        mbarrier_arrive_expect_tx(&bar.bias_full[bst], static_cast<uint32_t>(Tr::kBiasStageBytes));
#pragma unroll
        for (int pn = 0; pn < Tr::kBlockN / Tr::kPanel; ++pn)
          tma_load_4d(sm.bias[bst] + pn * Tr::kBlockM * Tr::kPanel, tm_bias, &bar.bias_full[bst], j0 + pn * Tr::kPanel,
                      p.bias_s.q ? c.i0 : 0, p.bias_s.h ? hi : 0, p.bias_s.b ? bi : 0);
      }
    }
  };
  auto load_v = [&](int t, uint32_t use) {
    const int st = static_cast<int>(use % Tr::kVStages);
    const int j0 = (c.n_tiles - 1 - t) * Tr::kBlockN;
    mbarrier_wait(&bar.v_empty[st], ((use / Tr::kVStages) & 1) ^ 1);
    mbarrier_arrive_expect_tx(&bar.v_full[st], Tr::kKVBytes);
#pragma unroll
    for (int pn = 0; pn < Tr::kPanels; ++pn)
      tma_load_4d(sm.v[st] + pn * Tr::kBlockN * Tr::kPanel, tm_v, &bar.v_full[st], pn * Tr::kPanel, j0, kvh, bi);
  };
  // kKAhead (a deeper K ring than V ring): K of key tile t + 1 before V of tile t, the order the
  // consumers read them in, so that K waits only for its own ring. No deadlock: V of tile t waits
  // for the P V of tile t - kVStages, which needs only K and V loads issued before it (and K of
  // t + 1 waits for the S of tile t + 1 - kKStages, likewise).
  for (int t = 0; t < c.n_tiles; ++t, ++ps.it) {
    load_k(t, ps.it);
    if constexpr (Tr::kKAhead) {
      if (t > 0) load_v(t - 1, ps.it - 1);
    } else {
      load_v(t, ps.it);
    }
    if (t == 0) load_q();
  }
  if constexpr (Tr::kKAhead) load_v(c.n_tiles - 1, ps.it - 1);
}

// ---------------------------------------------------------------------------------------------
// Consumer warpgroup `cw`: query rows i0 + 64 cw .. + 63 of the tile; warp w of it rows + 16 w ...

// General kernel: keep bits of a bool mask varying along the queries (any broadcast): bit
// 2 nt + e of keep[h] for column col + 8 nt + e of row row + 8 h (row: the thread's first row,
// col: its first column, both absolute). One row at a time (16-32 loads in flight), a column pair
// as one 16-bit load where the key stride is 1 and the row 2-byte aligned. Straight-line code:
// out-of-range elements (rows >= n_q, columns >= n_k, whose scores are never used or are masked by
// the key bound) read element 0 of the slice and are dropped by a select, so no per-element branch
// (and its reconvergence) is emitted: ncu showed a branchy version of this kernel spending a
// quarter of its samples on instruction fetch and BSYNC.
template <int kNS>
__device__ __forceinline__ void load_mask(uint32_t (&keep)[2], const FwdParams& p, const uint8_t* mask_row, int row,
                                          int col, int n_k) {
  const int n_q = static_cast<int>(p.n_q);
  const bool pairs = p.mask_s.k == 1 && p.mask_s.q % 2 == 0 && (reinterpret_cast<uintptr_t>(mask_row) & 1) == 0;
#pragma unroll 1
  for (int h = 0; h < 2; ++h) {
    const int r = row + 8 * h;
    const uint8_t* mr = mask_row + (r < n_q ? r : 0) * p.mask_s.q;
    uint32_t bits = 0;
    if (pairs) {
#pragma unroll
      for (int nt = 0; nt < kNS; ++nt) {
        const int j = col + 8 * nt;  // even
        const bool ok0 = r < n_q && j < n_k, ok1 = r < n_q && j + 1 < n_k;
        const uint32_t m = *reinterpret_cast<const uint16_t*>(mr + (ok0 ? j : 0));
        bits |= ((ok0 && (m & 0xffu)) ? 1u : 0u) << (2 * nt);
        bits |= ((ok1 && (m >> 8)) ? 1u : 0u) << (2 * nt + 1);
      }
    } else {
      bits = mask_line_bits<kNS>(mr, p.mask_s.k, col, n_k, r < n_q);
    }
    if (h == 0) keep[0] = bits; else keep[1] = bits;
  }
}

// Raw scores -> scores for the softmax with the bias added, -inf where the mask hides them (the mask
// wins over any bias value, NaN included, as on the other paths). bias_tile: the staged tile in
// shared memory (layout in consume_tile), or nullptr; bcast: it holds one row (a query-broadcast
// bias); wrow: this warp's first row in the tile.
// kBiasOnly (the bias-only kernel): s scale + bias, for a softmax scale of log2(e) (its exponent's
// FFMA); bias_tile never null (a runtime null made ptxas zero and predicate every element's add);
// the tile by ldmatrix, 8 loads instead of 32. The d = 64 kernel's bias then costs 2 instructions
// an element instead of ~4.5 (SASS). Otherwise (the full kernel) log2-domain scores s scale log2(e)
// + bias log2(e) for a softmax scale of 1, and 4-byte loads (ldmatrix made ptxas spill ~20% more
// there): that keeps P = 1 exact on a row with one visible key, 2^(x - x). Folded, P = 2^(rounding
// of x log2(e)), and under dropout O = V / (1 - p) can round to the other 16-bit neighbour at a
// tie, which sm90_stress.py saw as noise past its floor in the zero dQ / dK of such rows (3 fp16
// dropout cases with n_k = 1 of its 400).
template <typename T, int kBlockM, int kNS, bool kBiasOnly>
__device__ __forceinline__ void apply_extras(float (&s)[kNS][4], const uint32_t (&keep)[2],
                                             const unsigned char* bias_tile, bool bcast, int wrow, bool has_mask,
                                             float scale) {
  static_assert(kNS % 2 == 0, "bias pairs of n-tiles");
  const float kNegInf = -__int_as_float(0x7f800000);
  const int lane = threadIdx.x % 32;
  // 4-byte loads: this thread's pair of columns 2 (lane % 4) in rows lane / 4 (+ 8 h).
  const int sw = bcast ? 0 : lane / 4;
  const unsigned char* src = bias_tile + (bcast ? 0 : (wrow + lane / 4) * 128) + 4 * (lane % 4);
  // ldmatrix (x4) hands each thread row lane / 4 (+ 8 h), columns 2 (lane % 4), + 1 of an 8 x 8
  // block: the same pair. Matrix m (lanes 8 m ..): rows + 8 (m % 2), n-tile nt + m / 2; each lane
  // gives its row (row 0 for a query-broadcast bias), whose chunk is XOR row % 8.
  const int row = bcast ? 0 : wrow + 8 * ((lane / 8) % 2) + lane % 8;
  const bool bias_on = kBiasOnly || bias_tile != nullptr;
  const uint32_t msrc = kBiasOnly ? smem_addr(bias_tile) + row * 128 : 0;
  constexpr float kBiasScale = kBiasOnly ? 1.f : kLog2e;
  uint32_t bias2[4];
#pragma unroll
  for (int nt = 0; nt < kNS; ++nt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float2 b = make_float2(0.f, 0.f);
      if constexpr (kBiasOnly) {
        if (nt % 2 == 0 && h == 0) {
          const int n = nt + lane / 16;
          ldmatrix_x4(bias2, msrc + (n / 8) * kBlockM * 128 + (((n % 8) ^ (row % 8)) << 4));
        }
        b = unpack2<T>(bias2[2 * (nt % 2) + h]);
      } else if (bias_on) {
        b = unpack2<T>(*reinterpret_cast<const uint32_t*>(src + (nt / 8) * kBlockM * 128 + (bcast ? 0 : 8 * h * 128) +
                                                          (((nt % 8) ^ sw) << 4)));
      }
      s[nt][2 * h] = fmaf(s[nt][2 * h], scale, b.x * kBiasScale);
      s[nt][2 * h + 1] = fmaf(s[nt][2 * h + 1], scale, b.y * kBiasScale);
      if (has_mask) {
        s[nt][2 * h] = (keep[h] >> (2 * nt)) & 1 ? s[nt][2 * h] : kNegInf;
        s[nt][2 * h + 1] = (keep[h] >> (2 * nt + 1)) & 1 ? s[nt][2 * h + 1] : kNegInf;
      }
    }
}

// Transposes a 4x4 block of 32-bit words across the 4 lanes of a quad: lane L's w[j] on entry is
// lane j's w[L] on exit. Two butterfly stages (lane bit 0, then bit 1), one shuffle per word pair.
// Every lane of the warp must call it (full-mask shuffles).
__device__ __forceinline__ void quad_transpose(uint32_t (&w)[4]) {
  const int lane = threadIdx.x % 4;
#pragma unroll
  for (int m = 1; m <= 2; m <<= 1) {
    const bool hi = lane & m;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j & m) continue;  // the pair (j, j | m)
      const uint32_t got = __shfl_xor_sync(0xffffffffu, hi ? w[j] : w[j | m], m);
      if (hi) w[j] = got;
      else w[j | m] = got;
    }
  }
}

// The output of one warp's 16 rows: O / l (zeros where l = 0: the row saw no key), lse = (m + log2 l)
// ln 2 (+inf there). Rows past n_q are skipped (TMA read zeros for them). keep_scale: 1 / (1 - p)
// under dropout. The accumulator gives lane L of a quad the columns 8 nt + 2 (L % 4) of its two rows;
// a quad transpose per 4 tiles turns them into 8 consecutive columns per lane, so each quad writes
// 64 contiguous bytes of a row with 16-byte stores (full 32-byte sectors). Outputs whose rows are
// not 16-byte aligned take 4-byte stores, as does the kFull kernel (kVec16 = false): the transpose's
// registers made ptxas spill 52 more bytes there at d128 and 96 at d64 (none before at d64).
template <typename T, bool kVec16, int kNO>
__device__ __forceinline__ void store_rows(const FwdParams& p, int bi, int hi, int row0, const float (&o)[kNO][4],
                                           SplitSoftmax& softmax, float keep_scale) {
  static_assert(kNO % 4 == 0, "the quad transpose takes 4 column tiles at a time");
  const int lane = threadIdx.x % 32;
  softmax.finish();
  const uint64_t bh = static_cast<uint64_t>(bi) * p.h + hi;
  const uintptr_t row_bits =
      reinterpret_cast<uintptr_t>(p.o) | static_cast<uintptr_t>(p.o_sb | p.o_sh | p.o_sn) * sizeof(T);
  const bool vec16 = kVec16 && (row_bits & 15) == 0;  // every row 16-byte aligned
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t i = row0 + lane / 4 + 8 * h;
    const float l = softmax.l[h];
    const float inv = l == 0.f ? 0.f : keep_scale / l;
    T* og = static_cast<T*>(p.o) + int64_t{bi} * p.o_sb + int64_t{hi} * p.o_sh + i * p.o_sn;
    if (vec16) {
#pragma unroll
      for (int g = 0; g < kNO / 4; ++g) {
        uint32_t w[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) w[j] = pack2<T>(o[4 * g + j][2 * h] * inv, o[4 * g + j][2 * h + 1] * inv);
        quad_transpose(w);  // lane L % 4 now holds columns 32 g + 8 (L % 4) .. + 7
        if (i < p.n_q) *reinterpret_cast<uint4*>(og + 32 * g + 8 * (lane % 4)) = make_uint4(w[0], w[1], w[2], w[3]);
      }
    } else if (i < p.n_q) {
#pragma unroll
      for (int nt = 0; nt < kNO; ++nt) {
        const int col = 8 * nt + 2 * (lane % 4);
        *reinterpret_cast<uint32_t*>(og + col) = pack2<T>(o[nt][2 * h] * inv, o[nt][2 * h + 1] * inv);
      }
    }
    if (i < p.n_q && lane % 4 == 0) {
      float* lse = static_cast<float*>(p.lse) + bh * p.n_q + i;
      *lse = l == 0.f ? __int_as_float(0x7f800000) : (softmax.m[h] + __log2f(l)) * kLn2;
    }
  }
}

// A consumer warp's running state across the query tiles it walks. A tile's last P V is not issued
// at the end of the tile: it goes out with the next tile's first S, so the tensor cores compute
// it while the next Q arrives, and the finished tile's output is stored while that S computes.
// pending: a tile (this warp's rows of it: batch bi, head hi, first row row0) whose P sits in pa
// and whose last V is K/V use v_use; o and softmax are its running output and row statistics.
template <int kNO, int kKP>
struct ConsumerState {
  float o[kNO][4];       // O rows of this warp, wgmma accumulator layout
  uint32_t pa[kKP][4];   // P of the pending tile's last key tile, A-fragment layout
  SplitSoftmax softmax;
  bool pending = false;
  int bi = 0, hi = 0, row0 = 0;
  uint32_t v_use = 0;
};

// One query tile. The first S is issued with the previous tile's last P V (ConsumerState); per key
// tile t after the first: S_t = Q K_t^T and O += P_{t-1} V_{t-1} are issued together, the softmax
// of S_t runs while P V computes, then O is rescaled and P_t formed. The tile's last P V is left
// pending. Ping-pong: each issue of GEMMs is a turn taken in round robin by the consumer
// warpgroups (named barriers), so one warpgroup's softmax overlaps the others' GEMMs.
// The output's 16-byte stores (store_rows): not in the full general kernel (spills).
template <bool kGeneral, bool kFull>
constexpr bool kVec16Out = !(kGeneral && kFull);

template <typename T, typename Tr, bool kGeneral, bool kFull>
__device__ __forceinline__ void consume_tile(typename Tr::Smem& sm, typename Tr::Barriers& bar, const FwdParams& p,
                                             const TileCoord& c, int cw, PipeState& ps,
                                             ConsumerState<Tr::kD / 8, Tr::kBlockN / 16>& st) {
  using namespace sm90;
  constexpr int kNS = Tr::kBlockN / 8;  // 8-column groups of S
  constexpr int kNO = Tr::kD / 8;       // 8-column groups of O
  constexpr int kKP = Tr::kBlockN / 16; // k16 steps of P V
  const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  // 32-bit positions (sizes are checked on the host): fewer live registers next to the tiles.
  const int row0 = c.i0 + 64 * cw + 16 * warp;  // this warp's first query row
  const int shift = static_cast<int>(causal_shift(p));
  const int n_k = static_cast<int>(p.n_k);
  const bool causal = p.causal != Causal::kNone;
  const float scale_log2 = static_cast<float>(p.scale) * kLog2e;
  const int n_tiles = c.n_tiles;

  // General kernel (bias / any mask / dropout): the scores reach the softmax with the bias added and
  // the mask applied (load_mask, apply_extras): q.k scale + bias for a softmax scale of log2(e) in
  // the bias-only kernel, in the log2 domain already (softmax scale 1) in the full one.
  // Dropout: P of each tile (its row sums already taken whole) loses its dropped elements before
  // P V, and the output is scaled by 1 / (1 - p) at the end: the Philox words of every other path.
  Dropout drop;
  uint64_t drop_bh = 0;
  const bool has_bias = kGeneral && (!kFull || p.bias);  // the non-full general kernel always has one
  const uint8_t* mask_row = nullptr;
  float softmax_scale = scale_log2;
  if constexpr (kGeneral) softmax_scale = kFull ? 1.f : kLog2e;
  if constexpr (kFull) {
    drop.init(p);
    drop_bh = static_cast<uint64_t>(c.bi) * p.h + c.hi;
    // A mask varying along the queries (a key mask takes the plain kernel's key_keep below); the
    // plain kernel's kFull is dropout alone (kFwdDropoutPlain).
    if (kGeneral && p.mask && p.mask_s.q != 0 && p.n_q > 1) mask_row = p.mask + c.bi * p.mask_s.b + c.hi * p.mask_s.h;
  }
  const float keep_scale = kFull ? drop.keep_scale : 1.f;
  SplitSoftmax& softmax = st.softmax;
  auto& o = st.o;
  auto& pa = st.pa;
  if (n_tiles == 0) {  // no row of the tile sees a key: zeros and lse = +inf; nothing was loaded
    float zeros[kNO][4];
    zero_acc(zeros);
    SplitSoftmax none;
    none.init();
    store_rows<T, kVec16Out<kGeneral, kFull>>(p, c.bi, c.hi, row0, zeros, none, keep_scale);
    return;
  }
  const int qbuf = static_cast<int>(ps.q_it % Tr::kQBufs);  // this tile's Q buffer
  const uint32_t q_base = smem_addr(sm.q[qbuf]) + cw * 64 * 128;  // 64 rows into every Q panel
  // -inf outside the key bound and past the causal diagonal (raw scores: the scale is applied in
  // the softmax). Only the first visited tiles (the last key tiles) can need the element test.
  // Key mask (a bool mask constant along the queries, e.g. key padding; sm90_fwd_supported):
  // bit 2 nt + e of key_keep(t) is column 8 nt + 2 (lane % 4) + e of key tile t, the columns this
  // thread holds in both of its rows. Loaded after the S wgmma is issued, used after it is done.
  // Wider key tiles (kWideKeyTile) have no room for the bits: dispatch_dim sends no mask there.
  constexpr bool kKeyMaskBits = 2 * kNS <= 32;
  const uint8_t* key_mask =
      kKeyMaskBits && p.mask && !mask_row ? p.mask + c.bi * p.mask_s.b + c.hi * p.mask_s.h : nullptr;
  auto key_keep = [&](int t) -> uint32_t {
    if constexpr (!kKeyMaskBits) {
      return ~0u;
    } else {
      if (!key_mask) return ~0u;
      if constexpr (kKeyMaskBallot) {
        static_assert(Tr::kBlockN == 128, "ballot path: 4 bytes per lane cover the key tile");
        if (p.mask_s.k == 1 && (reinterpret_cast<uintptr_t>(key_mask) & 3) == 0) {
          // Lane l: bytes of columns 4 l .. 4 l + 3; ballot b: bit l set iff column 4 l + b kept.
          const int jl = (n_tiles - 1 - t) * Tr::kBlockN + 4 * lane;
          uint32_t word = 0;
          if (jl + 3 < n_k) {
            word = *reinterpret_cast<const uint32_t*>(key_mask + jl);
          } else {
#pragma unroll
            for (int b = 0; b < 4; ++b)
              if (jl + b < n_k) word |= static_cast<uint32_t>(key_mask[jl + b]) << (8 * b);
          }
          uint32_t w[4];
#pragma unroll
          for (int b = 0; b < 4; ++b) w[b] = __ballot_sync(0xffffffffu, (word >> (8 * b)) & 0xffu);
          // Column 8 nt + 2 (lane % 4) + e is bit 2 nt + (lane % 4) / 2 of w[2 (lane % 2) + e].
          const int sh = (lane % 4) / 2;
          const uint32_t w0 = ((lane & 1) ? w[2] : w[0]) >> sh, w1 = ((lane & 1) ? w[3] : w[1]) >> sh;
          return (w0 & 0x55555555u) | ((w1 & 0x55555555u) << 1);
        }
      }
      const int j0 = (n_tiles - 1 - t) * Tr::kBlockN + 2 * (lane % 4);
      uint32_t keep = 0;
#pragma unroll
      for (int nt = 0; nt < kNS; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int j = j0 + 8 * nt + e;
          if (j < n_k && key_mask[j * p.mask_s.k]) keep |= 1u << (2 * nt + e);
        }
      return keep;
    }
  };
  auto mask = [&](float (&s)[kNS][4], int t, uint32_t keep) {
    if (kKeyMaskBits && keep != ~0u) {
#pragma unroll
      for (int nt = 0; nt < kNS; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (!((keep >> (2 * nt + e % 2)) & 1)) s[nt][e] = -__int_as_float(0x7f800000);
    }
    const int j0 = (n_tiles - 1 - t) * Tr::kBlockN;
    const bool check = (causal && j0 + Tr::kBlockN - 1 > row0 + shift) || j0 + Tr::kBlockN > n_k;
    if (check) {
      // Element (nt, e) is column 8 nt + e % 2 + 2 (lane % 4), row lane / 4 + 8 (e / 2) (frag_col,
      // frag_row): the lane's parts go into the two bounds, so that each test compares one
      // register with an immediate. (Per-element column registers, hoisted out of the key loop,
      // held 32 of a consumer's 240 registers and made ptxas spill in four kernels.)
      const int lim = n_k - j0 - 2 * (lane % 4);
      const int diag = causal ? row0 + shift - j0 - 2 * (lane % 4) + lane / 4 : (1 << 30);
#pragma unroll
      for (int nt = 0; nt < kNS; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = 8 * nt + e % 2;
          if (c >= lim || c - 8 * (e / 2) > diag) s[nt][e] = -__int_as_float(0x7f800000);
        }
    }
  };
  // General kernel: the scores of key tile t (K/V use `use`) once its S wgmma retired. The
  // staged bias tile is read from its ring stage as it is added, then the stage is released; the
  // bits of a mask varying along the queries are loaded here too. (Fetched while the wgmma ran,
  // their 32-64 registers next to S, O and P made ptxas spill 250-500 bytes.)
  // Bias tile layout: row r, column c at panel c / 64, row r's 128 bytes, 16-byte chunk
  // (c % 64) / 8 XOR r % 8. This thread's rows are lane / 4 (+ 8) past a multiple of 8 (a
  // query-broadcast bias: row 0 for both); 8 rows x 4 columns of a read hit 32 banks.
  auto use_extras = [&](float (&s)[kNS][4], int t, uint32_t use) {
    if constexpr (kGeneral) {
      uint32_t bits[2] = {~0u, ~0u};
      if (kFull && mask_row)
        load_mask<kNS>(bits, p, mask_row, row0 + lane / 4, (n_tiles - 1 - t) * Tr::kBlockN + 2 * (lane % 4), n_k);
      const unsigned char* bias_tile = nullptr;
      int bst = 0;
      if (has_bias) {
        bst = use % Tr::kBiasStages;
        mbarrier_wait(&bar.bias_full[bst], (use / Tr::kBiasStages) & 1);
        bias_tile = reinterpret_cast<const unsigned char*>(sm.bias[bst]);
      }
      apply_extras<T, Tr::kBlockM, kNS, !kFull>(s, bits, bias_tile, p.bias_s.q == 0, 64 * cw + 16 * warp,
                                                kFull && mask_row, kFull ? scale_log2 : static_cast<float>(p.scale));
      if (has_bias) mbarrier_arrive(&bar.bias_empty[bst]);
    }
  };
  // Ping-pong turns: wait for this warpgroup's turn / hand the turn to the next one. A tile is
  // n_tiles turns (its first carries the previous tile's last P V), consume_finish one more; the
  // last warpgroup hands warpgroup 0 its first turn at the start and skips its own last
  // hand-over in consume_finish, so the named barriers balance over the block's work. (A block
  // whose tiles all see no key takes no turn: the start-up hand-over stays unconsumed at exit.)
  // The pending branch below holds its turn while it waits for Q and K: in the ping-pong kernels
  // (d = 64 on 3 warpgroups, and d = 128 with n_q <= 1k, causal or with n_k <= 1k; one Q buffer)
  // the other warpgroups' pending P V wait for that load too.
  auto turn_begin = [&] {
    if constexpr (Tr::kPingPong) named_barrier_sync(Tr::kSchedBarrier + cw, 256);
  };
  auto turn_end = [&] {
    if constexpr (Tr::kPingPong) named_barrier_arrive(Tr::kSchedBarrier + (cw + 1) % Tr::kConsumers, 256);
  };
  // The last S of the tile is done: the producer may load the next tile's Q.
  auto release_q = [&](int t) {
    if (t == n_tiles - 1 && lane == 0) mbarrier_arrive(&bar.q_empty[qbuf]);
  };
  auto kstage = [&](uint32_t it) { return static_cast<int>(it % Tr::kKStages); };
  auto kparity = [&](uint32_t it) { return (it / Tr::kKStages) & 1; };
  auto vstage = [&](uint32_t it) { return static_cast<int>(it % Tr::kVStages); };
  auto vparity = [&](uint32_t it) { return (it / Tr::kVStages) & 1; };

  // Prologue: the pending tile's last P V, then S of this tile's first key tile; the pending
  // tile's output is stored while S computes; then the softmax of S and P. Each branch waits for
  // every wgmma it issued: a wgmma issued on one path and waited for on another made ptxas
  // serialize every wgmma of the kernel (C7514; -20% throughput).
  float s[kNS][4];
  uint32_t it = ps.it;
  uint32_t keep;
  if (st.pending) {
    // P V first: it computes while this tile's Q (requested when the pending tile's last S was
    // done) and first K arrive.
    const int vst = vstage(st.v_use);
    mbarrier_wait(&bar.v_full[vst], vparity(st.v_use));
    turn_begin();
    wgmma_fence();
    sm90::gemm_rs_mnmajor<T, Tr::kD, Tr::kBlockN, Tr::kBlockN>(o, pa, smem_addr(sm.v[vst]));
    wgmma_commit_group();
    mbarrier_wait(&bar.q_full[qbuf], (ps.q_it / Tr::kQBufs) & 1);
    mbarrier_wait(&bar.k_full[kstage(it)], kparity(it));
    wgmma_fence();  // (else ptxas injects one after the waits' loops: C7519)
    sm90::gemm_ss_kmajor<T, Tr::kBlockN, Tr::kD, Tr::kBlockM, Tr::kBlockN>(s, q_base, smem_addr(sm.k[kstage(it)]));
    wgmma_commit_group();
    turn_end();
    keep = key_keep(0);
    wgmma_wait_group<1>();  // the pending P V done; S may still run
    fence_regs(o);
    fence_regs(pa);
    if (lane == 0) mbarrier_arrive(&bar.v_empty[vst]);
    store_rows<T, kVec16Out<kGeneral, kFull>>(p, st.bi, st.hi, st.row0, o, softmax, keep_scale);
    zero_acc(o);
    wgmma_wait_group<0>();
  } else {
    mbarrier_wait(&bar.q_full[qbuf], (ps.q_it / Tr::kQBufs) & 1);
    mbarrier_wait(&bar.k_full[kstage(it)], kparity(it));
    turn_begin();
    wgmma_fence();
    sm90::gemm_ss_kmajor<T, Tr::kBlockN, Tr::kD, Tr::kBlockM, Tr::kBlockN>(s, q_base, smem_addr(sm.k[kstage(it)]));
    wgmma_commit_group();
    turn_end();
    keep = key_keep(0);
    wgmma_wait_group<0>();
  }
  ++ps.q_it;
  softmax.init();
  fence_regs(s);
  if (lane == 0) mbarrier_arrive(&bar.k_empty[kstage(it)]);
  release_q(0);
  use_extras(s, 0, it);
  mask(s, 0, keep);
  {
    float alpha[2];
    softmax.scores(s, softmax_scale, alpha);  // O is still zero: no rescale
    if constexpr (kFull) {
      if (drop.on) dropout_tile_rows(drop, drop_bh, s, row0, (n_tiles - 1) * Tr::kBlockN);
    }
  }
#pragma unroll
  for (int kk = 0; kk < kKP; ++kk) acc_to_a<T>(pa[kk], s, kk);

  for (int t = 1; t < n_tiles; ++t) {
    const uint32_t cur = it + 1, prev = it;  // K/V uses of tiles t and t - 1
    mbarrier_wait(&bar.k_full[kstage(cur)], kparity(cur));
    mbarrier_wait(&bar.v_full[vstage(prev)], vparity(prev));
    turn_begin();
    wgmma_fence();
    // S of tile t = Q K^T, then O += P V of tile t - 1 (issue only).
    sm90::gemm_ss_kmajor<T, Tr::kBlockN, Tr::kD, Tr::kBlockM, Tr::kBlockN>(s, q_base, smem_addr(sm.k[kstage(cur)]));
    wgmma_commit_group();
    sm90::gemm_rs_mnmajor<T, Tr::kD, Tr::kBlockN, Tr::kBlockN>(o, pa, smem_addr(sm.v[vstage(prev)]));
    wgmma_commit_group();
    turn_end();
    keep = key_keep(t);
    wgmma_wait_group<1>();  // S done; P V may still run
    fence_regs(s);
    if (lane == 0) mbarrier_arrive(&bar.k_empty[kstage(cur)]);
    release_q(t);
    use_extras(s, t, cur);
    mask(s, t, keep);
    float alpha[2];
    softmax.scores(s, softmax_scale, alpha);
    if constexpr (kFull) {
      if (drop.on) dropout_tile_rows(drop, drop_bh, s, row0, (n_tiles - 1 - t) * Tr::kBlockN);
    }
    // P V done: O and P may be touched again. In a block of its own, so that ptxas keeps it behind
    // the softmax (the point of issuing P V before it; sm90::wgmma_wait_group_behind).
    wgmma_wait_group_behind<0>(n_k < 0);
    fence_regs(o);
    fence_regs(pa);
    if (lane == 0) mbarrier_arrive(&bar.v_empty[vstage(prev)]);
    SplitSoftmax::rescale(o, alpha);
#pragma unroll
    for (int kk = 0; kk < kKP; ++kk) acc_to_a<T>(pa[kk], s, kk);
    it = cur;
  }
  // The tile's last P V stays pending (issued with the next tile's first S, or by consume_finish).
  st.pending = true;
  st.bi = c.bi;
  st.hi = c.hi;
  st.row0 = row0;
  st.v_use = it;
  ps.it = it + 1;
}

// After a consumer's last tile: its pending P V, then the output. The last warpgroup takes no
// ping-pong hand-over (nobody waits for it), so the turn barriers end balanced.
template <typename T, typename Tr, bool kGeneral, bool kFull>
__device__ __forceinline__ void consume_finish(typename Tr::Smem& sm, typename Tr::Barriers& bar, const FwdParams& p,
                                               int cw, ConsumerState<Tr::kD / 8, Tr::kBlockN / 16>& st) {
  using namespace sm90;
  if (!st.pending) return;
  const uint32_t use = st.v_use;
  const int stage = static_cast<int>(use % Tr::kVStages);
  mbarrier_wait(&bar.v_full[stage], (use / Tr::kVStages) & 1);
  if constexpr (Tr::kPingPong) named_barrier_sync(Tr::kSchedBarrier + cw, 256);
  wgmma_fence();
  sm90::gemm_rs_mnmajor<T, Tr::kD, Tr::kBlockN, Tr::kBlockN>(st.o, st.pa, smem_addr(sm.v[stage]));
  wgmma_commit_group();
  if constexpr (Tr::kPingPong) {
    if (cw != Tr::kConsumers - 1) named_barrier_arrive(Tr::kSchedBarrier + cw + 1, 256);
  }
  wgmma_wait_group<0>();
  fence_regs(st.o);
  fence_regs(st.pa);
  if (threadIdx.x % 32 == 0) mbarrier_arrive(&bar.v_empty[stage]);
  Dropout drop;
  if constexpr (kFull) drop.init(p);
  store_rows<T, kVec16Out<kGeneral, kFull>>(p, st.bi, st.hi, st.row0, st.o, st.softmax, kFull ? drop.keep_scale : 1.f);
  st.pending = false;
}

// Grid: one block per SM (persistent) walking the work list with stride gridDim.x, or one block
// per work unit. Every role walks the same list.
template <typename T, typename Tr, bool kGeneral, bool kFull>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    sm90_fwd_kernel(const __grid_constant__ CUtensorMap tm_q,  // [b, h, n_q, d] box [kBlockM, 64]
                    const __grid_constant__ CUtensorMap tm_k,  // [b, h_kv, n_k, d] box [kBlockN, 64]
                    const __grid_constant__ CUtensorMap tm_v,  // [b, h_kv, n_k, d] box [kBlockN, 64]
                    const __grid_constant__ CUtensorMap tm_bias,  // general: [b, h, n_q, n_k] box [kBlockM, 64]
                    const FwdParams p) {
#if FLASH_MHA_SM90_ENABLED
  using namespace sm90;
  // The barriers live in static shared memory, which exists only in the sm_90a body: the host
  // checks the kernel's static size to know that this body (not an empty stub) was compiled.
  __shared__ typename Tr::Barriers bar;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t base = smem_addr(smem_raw);
  auto& sm = *reinterpret_cast<typename Tr::Smem*>(smem_raw + (((base + 1023) & ~1023u) - base));

  const WorkList work(p, Tr::kBlockM, Tr::kPersistent);
  const int wg = threadIdx.x / 128;
  if (threadIdx.x == 0) {
    for (int s = 0; s < Tr::kQBufs; ++s) {
      mbarrier_init(&bar.q_full[s], 1);
      mbarrier_init(&bar.q_empty[s], 4 * Tr::kConsumers);  // one arrival per consumer warp
    }
    for (int s = 0; s < Tr::kKStages; ++s) {  // kKStages >= kVStages
      mbarrier_init(&bar.k_full[s], 1);
      if (s < Tr::kVStages) mbarrier_init(&bar.v_full[s], 1);
      mbarrier_init(&bar.k_empty[s], 4 * Tr::kConsumers);
      if (s < Tr::kVStages) mbarrier_init(&bar.v_empty[s], 4 * Tr::kConsumers);
    }
    for (int s = 0; s < Tr::kBiasStages; ++s) {
      mbarrier_init(&bar.bias_full[s], 1);
      mbarrier_init(&bar.bias_empty[s], 128 * Tr::kConsumers);  // every consumer thread reads it
    }
    fence_barrier_init();
  }
  __syncthreads();

  PipeState ps;
  if (wg == 0) {
    setmaxnreg_dec<Tr::kProducerRegs>();
    if (threadIdx.x == 0) {
      tma_prefetch_desc(&tm_q);
      tma_prefetch_desc(&tm_k);
      tma_prefetch_desc(&tm_v);
      // One tile behind the walk: tile k is produced once tile k + 1 is known (its Q prefetch).
      bool have = false;
      TileCoord cur{};
      for (int u = blockIdx.x; u < work.units; u += gridDim.x) {
        int bh, qb_hi, qb_lo;
        const int n = work.tiles(p, u, bh, qb_hi, qb_lo);
        for (int i = 0; i < n; ++i) {
          const TileCoord c(p, bh, i == 0 ? qb_hi : qb_lo, Tr::kBlockM, Tr::kBlockN);
          if (have) produce_tile<T, Tr>(sm, bar, &tm_q, &tm_k, &tm_v, &tm_bias, p, cur, &c, ps);
          cur = c;
          have = true;
        }
      }
      if (have) produce_tile<T, Tr>(sm, bar, &tm_q, &tm_k, &tm_v, &tm_bias, p, cur, nullptr, ps);
    }
  } else {
    setmaxnreg_inc<Tr::kConsumerRegs>();
    const int cw = wg - 1;
    ConsumerState<Tr::kD / 8, Tr::kBlockN / 16> st;
    zero_acc(st.o);
    // Ping-pong: warpgroup 0 takes the first turn.
    if constexpr (Tr::kPingPong) {
      if (cw == Tr::kConsumers - 1) named_barrier_arrive(Tr::kSchedBarrier, 256);
    }
    if constexpr (Tr::kPersistent) {
      for (int u = blockIdx.x; u < work.units; u += gridDim.x) {
        int bh, qb_hi, qb_lo;
        const int n = work.tiles(p, u, bh, qb_hi, qb_lo);
        for (int i = 0; i < n; ++i)
          consume_tile<T, Tr, kGeneral, kFull>(sm, bar, p,
                                               TileCoord(p, bh, i == 0 ? qb_hi : qb_lo, Tr::kBlockM, Tr::kBlockN),
                                               cw, ps, st);
      }
    } else {
      // One unit of one tile per block, no loop: the loop's live state costs registers (d = 64 with
      // 3 consumer warpgroups has 160 each).
      int bh, qb_hi, qb_lo;
      work.tiles(p, blockIdx.x, bh, qb_hi, qb_lo);
      consume_tile<T, Tr, kGeneral, kFull>(sm, bar, p, TileCoord(p, bh, qb_hi, Tr::kBlockM, Tr::kBlockN), cw, ps,
                                           st);
    }
    consume_finish<T, Tr, kGeneral, kFull>(sm, bar, p, cw, st);
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// Host side

// Returns false (nothing launched) when a tensor map cannot be built.
template <typename T, int kD, int kBlockN, int kConsumers, bool kPingPong, bool kPersistent, bool kGeneral = false,
          bool kFull = false>
bool launch(const FwdParams& p, cudaStream_t stream) {
  using Tr = Sm90FwdTraits<T, kD, kBlockN, kConsumers, kPingPong, kPersistent, kGeneral>;
  // Key tiles wider than 128 have no key-mask bits (consume_tile): should a mask ever be sent
  // there, refuse it, and sm90_fwd runs the portable kernel instead of ignoring the mask.
  if constexpr (!kGeneral && kBlockN > 128) {
    if (p.mask) return false;
  }
  CUtensorMap tq, tk, tv, tb{};
  if (!make_map(&tq, p.dtype, p.q, p.b, p.h, p.n_q, p.d, p.q_sb, p.q_sh, p.q_sn, Tr::kBlockM) ||
      !make_map(&tk, p.dtype, p.k, p.b, p.h_kv, p.n_k, p.d, p.k_sb, p.k_sh, p.k_sn, Tr::kBlockN) ||
      !make_map(&tv, p.dtype, p.v, p.b, p.h_kv, p.n_k, p.d_v, p.v_sb, p.v_sh, p.v_sn, Tr::kBlockN))
    return false;
  // The bias map: broadcast dims (stride 0) have size 1; the key dim plays the role of d.
  if (kGeneral && p.bias) {
    const Strided4& s = p.bias_s;
    if (!make_map(&tb, p.dtype, p.bias, s.b ? p.b : 1, s.h ? p.h : 1, s.q ? p.n_q : 1, p.n_k, s.b, s.h, s.q,
                  Tr::kBlockM))
      return false;
  }
  const int64_t units = WorkList(p, Tr::kBlockM, kPersistent).units;
  const int64_t blocks = kPersistent ? imin(units, sm_count()) : units;
  if (blocks == 0) return true;
  auto kernel = sm90_fwd_kernel<T, Tr, kGeneral, kFull>;
  allow_smem(kernel, Tr::kSmemBytes);
  kernel<<<static_cast<unsigned>(blocks), Tr::kThreads, Tr::kSmemBytes, stream>>>(tq, tk, tv, tb, p);
  return true;
}

// What only the general kernel takes: a bias, dropout, or a mask that varies along the queries.
inline bool needs_general(const FwdParams& p) {
  return p.bias || p.dropout_p > 0.0 || (p.mask && p.mask_s.q != 0 && p.n_q > 1);
}

// The configurations sm90_fwd runs (see NOTES.md for the measurements behind them):
// <T, d, key tile, consumer warpgroups, ping-pong, persistent, general, full>.
template <typename T>
bool dispatch_dim(const FwdParams& p, cudaStream_t stream) {
  // Dropout alone (kFwdDropoutPlain): the plain traits with the draws, 2 consumer warpgroups.
  if constexpr (kFwdDropoutPlain) {
    if (dropout_alone(p)) {
      return p.d == 64 ? launch<T, 64, 128, 2, false, true, false, true>(p, stream)
                       : launch<T, 128, 128, 2, false, true, false, true>(p, stream);
    }
  }
  // General: 2 consumer warpgroups at either d (240 registers each; with 3 at d = 64, dropout's
  // Philox state alone made ptxas spill 736 bytes), but 3 in ping-pong for the bias-only kernel at
  // d = 64 past 2k queries (kFwdBias3WG). Otherwise two instantiations: a bias (and a key mask)
  // only, without spills; full: also dropout and masks varying along the queries (their code made
  // ptxas spill 36 / 220 bytes at d = 64 / 128 in the bias-only case too).
  if constexpr (kSm90FwdGeneral) {
    if (needs_general(p)) {
      const bool full = p.dropout_p > 0.0 || (p.mask && p.mask_s.q != 0 && p.n_q > 1);
      if (p.d == 64) {
        if constexpr (kFwdBias3WG) {
          if (!full && p.n_q > 2048) return launch<T, 64, 128, 3, true, true, true, false>(p, stream);
        }
        return full ? launch<T, 64, 128, 2, false, true, true, true>(p, stream)
                    : launch<T, 64, 128, 2, false, true, true, false>(p, stream);
      }
      return full ? launch<T, 128, 128, 2, false, true, true, true>(p, stream)
                  : launch<T, 128, 128, 2, false, true, true, false>(p, stream);
    }
  }
  // d = 64: 3 consumer warpgroups, ping-pong, persistent (24-76 bytes of spills at 160 registers
  // a thread, still the fastest: +2-7% over one block per unit), except causal with n_q <= 2k: there
  // 192-row query tiles waste a third of their work on the diagonal and the short last tile, and 2
  // warpgroups ran +48% (512), +22% (1k), +10% (2k) but -7% at 4k (and -1..-6% non-causal at
  // 512-4k; 2 warpgroups in ping-pong: -1..-4% at 1k, causal 1k -1%). d = 128: persistent
  // without ping-pong measured 1-3% faster than with it at long shapes, but ping-pong wins where
  // the key loops are short: causal with n_q <= 1k (+1.5-5%), non-causal at n_q = n_k = 1k (+1.1 /
  // 1.2 / 4.5% in three runs); key tiles of 176 (kWideKeyTile) ran +2-3% over 128 at n_k >= 8k,
  // -4..-6% at 2k-4k (H200, NOTES.md).
  if (p.d == 64) {
    if (p.causal != Causal::kNone && p.n_q <= 2048) return launch<T, 64, 128, 2, false, true>(p, stream);
    return launch<T, 64, 128, 3, true, true>(p, stream);
  }
  if (p.n_q <= 1024 && (p.causal != Causal::kNone || p.n_k <= 1024))
    return launch<T, 128, 128, 2, true, true>(p, stream);
  if constexpr (kWideKeyTile) {
    if (p.causal == Causal::kNone && !p.mask && p.n_k > 4096) return launch<T, 128, 176, 2, false, true>(p, stream);
  }
  return launch<T, 128, 128, 2, false, true>(p, stream);
}


// Whether this binary holds the sm_90a body of the kernels (asked once, of one configuration).
bool kernel_compiled_for_sm90a() {
  using Tr = Sm90FwdTraits<__nv_bfloat16, 64, 128, 3, true, true>;
  static const bool ok = has_sm90a_body(sm90_fwd_kernel<__nv_bfloat16, Tr, false, false>);
  return ok;
}

}  // namespace

// TMA needs 16-byte aligned bases and strides that are multiples of 16 bytes (8 elements); the
// kernels take d == d_v in {64, 128}; bias, masks varying along the queries and dropout only with
// kSm90FwdGeneral (key masks always). Everything else goes to sm80.
bool sm90_fwd_supported(const FwdParams& p) {
  if (p.dtype != Dtype::kFloat16 && p.dtype != Dtype::kBFloat16) return false;
  if (p.d != p.d_v || (p.d != 64 && p.d != 128)) return false;
  // Without the general kernel: no bias or dropout, and a mask only when it is constant along the
  // queries (key padding: bits per key tile in the plain kernel).
  if (!kSm90FwdGeneral && needs_general(p)) return false;
  if (p.bias && !bias_tma_ok(p)) return false;  // the bias tiles come by TMA
  // The softmax takes the row maximum of the unscaled scores, then scales it by scale * log2(e) in
  // float: a scale near float's range could turn a finite maximum into +inf and make the row look
  // empty (zeros, lse = +inf). Such scales go to the portable path.
  if (!scale_foldable(p.scale)) return false;
  if (p.h_kv <= 0 || p.h % p.h_kv) return false;
  // TMA coordinates and the kernel's tile indices are 32-bit.
  constexpr int64_t kMaxCoord = (int64_t{1} << 30);
  if (p.n_q > kMaxCoord || p.n_k > kMaxCoord || p.b * p.h > kMaxCoord / 2) return false;
  const int64_t strides[] = {p.q_sb, p.q_sh, p.q_sn, p.k_sb, p.k_sh, p.k_sn, p.v_sb, p.v_sh, p.v_sn};
  for (int64_t s : strides)
    if (s % 8 || s < 0 || s >= (int64_t{1} << 38)) return false;
  if (p.o_sb % 2 || p.o_sh % 2 || p.o_sn % 2) return false;  // 4-byte output stores
  if (!aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v) || (reinterpret_cast<uintptr_t>(p.o) & 3)) return false;
  return encode_tiled() != nullptr && kernel_compiled_for_sm90a();
}

void sm90_fwd(const FwdParams& p, cudaStream_t stream) {
  const bool launched = p.dtype == Dtype::kFloat16 ? dispatch_dim<__half>(p, stream)
                                                   : dispatch_dim<__nv_bfloat16>(p, stream);
  if (!launched) sm80_fwd(p, stream);  // a view TMA cannot describe (e.g. overlapping strides)
}

}  // namespace flash_mha::cuda
