// Pieces of the tensor-core kernels that act on one warp's mma accumulator tile:
// the score epilogue (scale, bias, mask, causal, bounds) in the log2 domain, the online softmax
// state, and the dropout keep-bits of a fragment.
//
// A warp tile acc[kN][4] holds a [16, 8 kN] block in mma C layout: element e of n-tile nt is at
//   row = lane / 4 + 8 (e / 2),  col = 8 nt + 2 (lane % 4) + e % 2.
#pragma once
#include "common.cuh"
#include "ptx.cuh"

namespace flash_mha::cuda {

constexpr float kLog2e = 1.4426950408889634f;  // exp(x) == exp2(x * log2(e))
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ int frag_row(int lane, int e) { return lane / 4 + 8 * (e / 2); }
__device__ __forceinline__ int frag_col(int lane, int nt, int e) { return 8 * nt + 2 * (lane % 4) + e % 2; }

template <typename T>
__device__ __forceinline__ uint32_t bits16(T x) {
  return *reinterpret_cast<const uint16_t*>(&x);
}
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t v);
template <>
__device__ __forceinline__ float2 unpack2<__half>(uint32_t v) {
  return __half22float2(*reinterpret_cast<const __half2*>(&v));
}
template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t v) {
  // bf16 is float's upper half: one shift or AND each (the intrinsic took a PRMT and an IMAD for
  // the upper element; SASS of the sm90 bias forward).
  return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u));
}

// Two adjacent elements of a bias (a 4-byte aligned pair of 16-bit T, an 8-byte aligned float pair)
// in shared or global memory, as floats.
template <typename T>
__device__ __forceinline__ float2 load_pair(const T* p) {
  if constexpr (sizeof(T) == 2) {
    return unpack2<T>(*reinterpret_cast<const uint32_t*>(p));
  } else {
    return *reinterpret_cast<const float2*>(p);
  }
}

// Keep bits of two adjacent mask bytes (bit x: byte x is nonzero), read as one 16-bit word.
__device__ __forceinline__ uint32_t keep_pair(const uint8_t* p) {
  const uint32_t m = *reinterpret_cast<const uint16_t*>(p);
  return ((m & 0xffu) != 0 ? 1u : 0u) | ((m & 0xff00u) != 0 ? 2u : 0u);
}

// Everything the score epilogue needs about one (batch, head).
struct ScoreCtx {
  const void* bias;       // dtype T, broadcast [b, h, n_q, n_k] via bias_s
  const uint8_t* mask;    // broadcast via mask_s
  Strided4 bias_s, mask_s;
  int64_t bi, hi, n_q, n_k, shift;
  Causal causal;
  float scale_log2;       // scale * log2(e)

  __device__ __forceinline__ ScoreCtx(const FwdParams& p, int64_t bi_, int64_t hi_)
      : bias(p.bias), mask(p.mask), bias_s(p.bias_s), mask_s(p.mask_s), bi(bi_), hi(hi_), n_q(p.n_q),
        n_k(p.n_k), shift(causal_shift(p)), causal(p.causal),
        scale_log2(static_cast<float>(p.scale) * kLog2e) {}
};

// In place: acc (raw q.k) -> log2-domain score s * log2(e), -inf where (i, j) is invisible, with
// the bias / mask read element by element from global memory (the layouts the kernels cannot stage).
// kKeyRows: the tile's rows are keys and its columns queries (the backward's S^T).
// check: apply the causal rule per element (tiles on the causal diagonal); bounds always apply.
template <typename T, int kN, bool kKeyRows>
__device__ __forceinline__ void score_tile_log2(const ScoreCtx& c, float (&acc)[kN][4], int64_t row0, int64_t col0,
                                                bool check) {
  const int lane = threadIdx.x % 32;
  const float neg_inf = -__int_as_float(0x7f800000);
#pragma unroll
  for (int nt = 0; nt < kN; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int rr = frag_row(lane, e), cc = frag_col(lane, nt, e);
      const int64_t r = row0 + rr, col = col0 + cc;
      const int64_t i = kKeyRows ? col : r, j = kKeyRows ? r : col;
      float s = acc[nt][e] * c.scale_log2;
      bool vis = i < c.n_q && j < c.n_k;
      if (check) vis = vis && causal_visible(c.causal, i, j, c.shift);
      if (c.mask && vis) vis = c.mask[offset4(c.mask_s, c.bi, c.hi, i, j)] != 0;
      if (c.bias && vis) {
        const T b = static_cast<const T*>(c.bias)[offset4(c.bias_s, c.bi, c.hi, i, j)];
        s += to_acc<float>(b) * kLog2e;
      }
      acc[nt][e] = vis ? s : neg_inf;
    }
  }
}

// Tile-local limits for clamp_tile: int64 distances clamped into int range.
__device__ __forceinline__ int clamp_int(int64_t x) {
  return static_cast<int>(x < -(1 << 30) ? -(1 << 30) : (x > (1 << 30) ? (1 << 30) : x));
}

// The score epilogue without bias or mask: acc -> acc * scale_log2 (kScale; without it the scores
// stay raw, for a softmax that folds the scale into its exponent), and when `check` (uniform: a
// tile on the key/query bound or the causal diagonal) -inf where the tile-local element (r, c) has
// r >= row_limit, c >= col_limit, or (query - key offset) past the diagonal: visible iff
// (kKeyRows ? r - c : c - r) <= diag, with diag = (first query + shift) - first key.
template <int kN, bool kKeyRows, bool kScale = true>
__device__ __forceinline__ void scale_mask_tile(float (&acc)[kN][4], float scale_log2, bool check, int row_limit,
                                                int col_limit, int diag) {
  const int lane = threadIdx.x % 32;
  const float neg_inf = -__int_as_float(0x7f800000);
#pragma unroll
  for (int nt = 0; nt < kN; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float s = kScale ? acc[nt][e] * scale_log2 : acc[nt][e];
      if (check) {
        const int r = frag_row(lane, e), c = frag_col(lane, nt, e);
        const bool vis = r < row_limit && c < col_limit && (kKeyRows ? r - c : c - r) <= diag;
        s = vis ? s : neg_inf;
      }
      acc[nt][e] = s;
    }
  }
}

// The general score epilogue once a tile's bias and mask elements are at hand (shared memory, or
// registers): s = acc * scale_log2 + bias * log2(e), then -inf where the mask drops the element or,
// when `check`, where scale_mask_tile's bounds / diagonal rule would. bias(nt, h) -> float2: the bias
// of elements 2 h, 2 h + 1 of n-tile nt (kBias); keep(nt, h) -> bits 0, 1: those elements pass the
// mask (kMask). The elements are added before the visibility select, so an inf in the bias of an
// invisible element cannot turn into NaN.
template <int kN, bool kKeyRows, bool kBias, bool kMask, class Bias, class Keep>
__device__ __forceinline__ void biased_tile(float (&acc)[kN][4], float scale_log2, const Bias& bias, const Keep& keep,
                                            bool check, int row_limit, int col_limit, int diag) {
  const int lane = threadIdx.x % 32;
  const float neg_inf = -__int_as_float(0x7f800000);
#pragma unroll
  for (int nt = 0; nt < kN; ++nt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float s0 = acc[nt][2 * h] * scale_log2, s1 = acc[nt][2 * h + 1] * scale_log2;
      if constexpr (kBias) {
        const float2 b = bias(nt, h);
        s0 = fmaf(b.x, kLog2e, s0);
        s1 = fmaf(b.y, kLog2e, s1);
      }
      uint32_t k = 3u;
      if constexpr (kMask) k = keep(nt, h);
      if (check) {
        const int r = frag_row(lane, 2 * h), c = frag_col(lane, nt, 0);
        const bool in0 = r < row_limit && c < col_limit && (kKeyRows ? r - c : c - r) <= diag;
        const bool in1 = r < row_limit && c + 1 < col_limit && (kKeyRows ? r - c - 1 : c + 1 - r) <= diag;
        k &= (in0 ? 1u : 0u) | (in1 ? 2u : 0u);
      }
      acc[nt][2 * h] = k & 1u ? s0 : neg_inf;
      acc[nt][2 * h + 1] = k & 2u ? s1 : neg_inf;
    }
  }
}

// biased_tile with the bias / mask presence decided at run time (block-uniform), one unrolled copy
// per combination.
template <int kN, bool kKeyRows, class Bias, class Keep>
__device__ __forceinline__ void biased_tile_rt(float (&acc)[kN][4], float scale_log2, bool has_bias, const Bias& bias,
                                               bool has_mask, const Keep& keep, bool check, int row_limit,
                                               int col_limit, int diag) {
  if (has_bias && has_mask) {
    biased_tile<kN, kKeyRows, true, true>(acc, scale_log2, bias, keep, check, row_limit, col_limit, diag);
  } else if (has_bias) {
    biased_tile<kN, kKeyRows, true, false>(acc, scale_log2, bias, keep, check, row_limit, col_limit, diag);
  } else if (has_mask) {
    biased_tile<kN, kKeyRows, false, true>(acc, scale_log2, bias, keep, check, row_limit, col_limit, diag);
  } else {
    scale_mask_tile<kN, kKeyRows>(acc, scale_log2, check, row_limit, col_limit, diag);
  }
}

// Online softmax over key tiles for the two rows a thread holds (lane / 4 and lane / 4 + 8).
// m: running max of log2-domain scores; l: this thread's partial row sum of 2^(s - m) (the four
// threads of a row are summed once, at the end).
struct OnlineSoftmax {
  float m[2], l[2];

  __device__ __forceinline__ void init() {
    m[0] = m[1] = -__int_as_float(0x7f800000);
    l[0] = l[1] = 0.f;
  }

  // s: log2-domain scores -> unnormalized probabilities 2^(s - m_new). o: output accumulator
  // (rows as s), rescaled by 2^(m_old - m_new).
  template <int kN, int kNO>
  __device__ __forceinline__ void update(float (&s)[kN][4], float (&o)[kNO][4]) {
    float alphas[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = m[h];
#pragma unroll
      for (int nt = 0; nt < kN; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * h], s[nt][2 * h + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // A row with nothing visible yet keeps m = -inf; subtract 0 instead so 2^(-inf) = 0, not NaN.
      const float m_use = mx == -__int_as_float(0x7f800000) ? 0.f : mx;
      const float alpha = ex2_approx(m[h] - m_use);
      m[h] = mx;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kN; ++nt) {
        s[nt][2 * h] = ex2_approx(s[nt][2 * h] - m_use);
        s[nt][2 * h + 1] = ex2_approx(s[nt][2 * h + 1] - m_use);
        sum += s[nt][2 * h] + s[nt][2 * h + 1];
      }
      l[h] = l[h] * alpha + sum;
      alphas[h] = alpha;
    }
    // Once the row maxima settle, alpha is 1 for every row of the warp: skip the 2 kNO multiplies.
    if (__any_sync(0xffffffffu, alphas[0] != 1.f || alphas[1] != 1.f)) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int nt = 0; nt < kNO; ++nt) {
          o[nt][2 * h] *= alphas[h];
          o[nt][2 * h + 1] *= alphas[h];
        }
      }
    }
  }

  // Row sums over the four threads of each row.
  __device__ __forceinline__ void finish() {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
      l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
    }
  }
};

// Online softmax: keep a row's reference maximum until the row's scores exceed it by more than
// kRescaleMargin (log2 units), instead of moving it (and rescaling O) whenever it grows. Exact: O
// and l share the reference, and probabilities up to 2^8 are harmless in float and in the 16-bit P
// of P V. ncu: the O rescale (64 FMUL a thread) ran in ~96% of the key tiles at d128 1k, where some
// row of a warp's 16 still finds a larger score in most tiles (NOTES.md, GPU record 2026-11-27
// 14:25, item 5). A/B with kDescriptorAdvance on in both (H200, 2026-11-27,
// benchmarks/results/H200-ab-flags-a6bab56.txt): Hopper forward +1-2%. Used by SplitSoftmax (the
// Hopper forward and the sm80 plain forward).
constexpr bool kLazyRescale = true;
constexpr float kRescaleMargin = 8.f;

// OnlineSoftmax (m in log2 units of the scaled scores) split in two halves so that the output
// rescale can wait for an in-flight P V (Hopper): scores() turns raw q.k scores (-inf where
// invisible) into probabilities and returns the per-row rescale factors, rescale() applies them to O.
// The scale is folded into the exponent: 2^(s scale log2e - m) is one FFMA + EX2 (scale > 0, so
// the row maximum of the raw scores gives m). Maxima and sums use 4 independent partials: the
// softmax sits on each warpgroup's critical path, so short dependency chains matter.
struct SplitSoftmax : OnlineSoftmax {
  template <int kN>
  __device__ __forceinline__ void scores(float (&s)[kN][4], float scale_log2, float (&alpha)[2]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx4[4], sum4[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) mx4[i] = s[0][2 * h];
#pragma unroll
      for (int nt = 0; nt < kN; ++nt) mx4[nt % 4] = fmaxf(mx4[nt % 4], fmaxf(s[nt][2 * h], s[nt][2 * h + 1]));
      float mx = fmaxf(fmaxf(mx4[0], mx4[1]), fmaxf(mx4[2], mx4[3]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      mx = fmaxf(m[h], mx * scale_log2);
      // kLazyRescale: a maximum that grew by at most kRescaleMargin keeps the old one (alpha = 1);
      // -inf - -inf is NaN, so a row that saw nothing yet always takes the new maximum.
      if constexpr (kLazyRescale) {
        if (mx - m[h] <= kRescaleMargin) mx = m[h];
      }
      // Nothing visible yet: m stays -inf; subtract 0 so that 2^(-inf) = 0, not NaN.
      const float m_use = mx == -__int_as_float(0x7f800000) ? 0.f : mx;
      alpha[h] = ex2_approx(m[h] - m_use);
      m[h] = mx;
#pragma unroll
      for (int i = 0; i < 4; ++i) sum4[i] = 0.f;
#pragma unroll
      for (int nt = 0; nt < kN; ++nt) {
        s[nt][2 * h] = ex2_approx(fmaf(s[nt][2 * h], scale_log2, -m_use));
        s[nt][2 * h + 1] = ex2_approx(fmaf(s[nt][2 * h + 1], scale_log2, -m_use));
        sum4[nt % 4] += s[nt][2 * h] + s[nt][2 * h + 1];
      }
      l[h] = l[h] * alpha[h] + ((sum4[0] + sum4[1]) + (sum4[2] + sum4[3]));
    }
  }
  // Once the row maxima settle, alpha is 1 for every row of the warp: skip the multiplies.
  template <int kNO>
  __device__ __forceinline__ static void rescale(float (&o)[kNO][4], const float (&alpha)[2]) {
    if (!__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) return;
#pragma unroll
    for (int nt = 0; nt < kNO; ++nt) {
      o[nt][0] *= alpha[0];
      o[nt][1] *= alpha[0];
      o[nt][2] *= alpha[1];
      o[nt][3] *= alpha[1];
    }
  }
};

// The bias / mask elements of one thread's share of a [16, 8 kN] fragment tile, fetched while
// the tile's wgmma runs (the Hopper general backward where the bias is not staged): bias2[nt][h] holds the T pair of columns
// 8 nt + 2 (lane % 4), + 1 of fragment row lane / 4 + 8 h; keep[h] bit 2 nt + e: column
// 8 nt + 2 (lane % 4) + e of that row is visible under the mask.
template <int kN>
struct TileExtras {
  uint32_t bias2[kN][2];
  uint32_t keep[2];
};

// Keep bits of kN 8-column groups of one line of a bool mask (the Hopper general kernels): bit
// 2 nt + e for element first + 8 nt + e of the line, `stride` bytes apart, visible iff the line is
// in range (line_ok), the element is below `limit` and its byte is nonzero. Straight-line code:
// out-of-range elements read element 0 of the line and are dropped by a select (no per-element
// branch and reconvergence: ncu showed a branchy version costing a quarter of a kernel's time).
template <int kN>
__device__ __forceinline__ uint32_t mask_line_bits(const uint8_t* line, int64_t stride, int first, int limit,
                                                   bool line_ok) {
  uint32_t bits = 0;
#pragma unroll
  for (int nt = 0; nt < kN; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int j = first + 8 * nt + e;
      const bool ok = line_ok && j < limit;
      const uint8_t m = line[(ok ? j : 0) * stride];
      bits |= (ok && m != 0 ? 1u : 0u) << (2 * nt + e);
    }
  return bits;
}

// Zeroes dropped probabilities of a [16, 8 kN] query-row tile (rows = queries row0.., cols = keys
// col0.., row0 % 16 == 0, col0 % 16 == 0). The lane's elements of n-tiles 2 np, 2 np + 1 (rows
// lane / 4 + 8 h, columns 16 np + 8 u + 2 (lane % 4) + e) are one Philox call's eight (philox.h):
// element (u, h, e) is the half e of word 2 h + u. No lane needs another's words.
template <int kN>
__device__ __forceinline__ void dropout_tile_rows(const Dropout& drop, uint64_t bh, float (&s)[kN][4], int64_t row0,
                                                  int64_t col0) {
  static_assert(kN % 2 == 0, "n-tile pairs");
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int np = 0; np < kN / 2; ++np) {
    const Philox4 w = drop.words(bh, row0 + lane / 4, col0 + 16 * np + 2 * (lane % 4));
#pragma unroll
    for (int u = 0; u < 2; ++u)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t word = w.x[2 * h + u];
        if (!drop.keep_lo(word)) s[2 * np + u][2 * h] = 0.f;
        if (!drop.keep_hi(word)) s[2 * np + u][2 * h + 1] = 0.f;
      }
  }
}

// dropout_tile_rows on P already packed to 16-bit A fragments (acc_to_a: a[2 u + h] holds columns
// 8 u + 2 (lane % 4), + 1 of row lane / 4 + 8 h of a [16, 16] step at col0): the same draw and
// decisions, applied as masks (a dropped element becomes +0). The sm80 plain forward with kDropout
// packs the whole tile first, so that the draws run beside half the registers of the float scores.
__device__ __forceinline__ void dropout_packed_step(const Dropout& drop, uint64_t bh, int64_t row0, int64_t col0,
                                                    uint32_t (&a)[4]) {
  const int lane = threadIdx.x % 32;
  const Philox4 w = drop.words(bh, row0 + lane / 4, col0 + 2 * (lane % 4));
#pragma unroll
  for (int u = 0; u < 2; ++u)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t word = w.x[2 * h + u];
      a[2 * u + h] &= (drop.keep_lo(word) ? 0x0000ffffu : 0u) | (drop.keep_hi(word) ? 0xffff0000u : 0u);
    }
}

// Keep bits (bit 4 u + e for element e of n-tile nt0 + u) of n-tiles nt0, nt0 + 1 of a [16, 8 kN]
// key-row tile (rows = keys key0.., key0 % 16 == 0; cols = queries q0.., (q0 + 8 nt0) % 16 == 0),
// the backward's S^T layout: element e of n-tile nt0 + u is key key0 + lane / 4 + 8 (e / 2), query
// q0 + 8 (nt0 + u) + 2 (lane % 4) + e % 2. In philox.h's terms (queries are the rows i, keys the
// columns j) element (u, e) is the half lane / 4 % 2 of word 2 u + e / 2 of the call of query
// column x = e % 2. Lanes 4 r + c and (4 r + c) ^ 4 (rows r, r ^ 1) need the same two calls (x = 0,
// 1), the low and the high halves: each draws call x = r % 2 and sends the other the four halves it
// needs, packed in two words.
__device__ __forceinline__ uint32_t dropout_bits_keyrows(const Dropout& drop, uint64_t bh, int64_t key0, int64_t q0,
                                                          int nt0) {
  const int lane = threadIdx.x % 32;
  const int rho = (lane / 4) & 1;  // this lane's half, and the call it draws
  const Philox4 w = drop.words(bh, q0 + 8 * nt0 + 2 * (lane % 4) + rho, key0 + lane / 4);
  // Halves rho of words (0, 1) and (2, 3), low then high: this lane's; the partner's (1 - rho).
  const uint32_t mine = rho ? 0x7632u : 0x5410u, theirs = rho ? 0x5410u : 0x7632u;
  const uint32_t own0 = __byte_perm(w.x[0], w.x[1], mine), own1 = __byte_perm(w.x[2], w.x[3], mine);
  const uint32_t got0 = __shfl_xor_sync(0xffffffffu, __byte_perm(w.x[0], w.x[1], theirs), 4);
  const uint32_t got1 = __shfl_xor_sync(0xffffffffu, __byte_perm(w.x[2], w.x[3], theirs), 4);
  // Call x: this lane's own words if x == rho, else the partner's.
  const uint32_t x0w0 = rho ? got0 : own0, x0w1 = rho ? got1 : own1;
  const uint32_t x1w0 = rho ? own0 : got0, x1w1 = rho ? own1 : got1;
  const uint32_t packed[2][2] = {{x0w0, x0w1}, {x1w0, x1w1}};  // [x][u]: halves of words 2 u, 2 u + 1
  uint32_t bits = 0;
#pragma unroll
  for (int u = 0; u < 2; ++u)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const uint32_t word = packed[e % 2][u];
      const bool keep = e / 2 ? drop.keep_hi(word) : drop.keep_lo(word);
      bits |= static_cast<uint32_t>(keep) << (4 * u + e);
    }
  return bits;
}

}  // namespace flash_mha::cuda
