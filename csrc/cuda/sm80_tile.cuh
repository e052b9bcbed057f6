// Shared-memory tiles for the tensor-core kernels: the XOR swizzle, the cp.async tile loader, the
// ldmatrix address patterns of the mma.m16n8k16 operands (16-bit types), and the operand fragments
// through which the same kernels run float32 on tf32 tensor cores (3xTF32, see Frag<float>).
#pragma once
#include "common.cuh"
#include "ptx.cuh"

namespace flash_mha::cuda {

// Element offset of (row, 16-byte chunk) in a [rows, kCols] tile whose chunks hold kChunk elements
// (8 of a 16-bit type, 4 floats). Chunk c of row r is stored at chunk c ^ (r % 8): the 8 rows one
// ldmatrix phase reads then lie in 8 different 16-byte bank groups (a row of >= 128 bytes would
// otherwise put them all in one).
template <int kCols, int kChunk = 8>
__device__ __forceinline__ int swz(int row, int chunk) {
  static_assert(kCols % (8 * kChunk) == 0, "swizzled tiles need rows of at least 8 chunks");
  return row * kCols + (chunk ^ (row & 7)) * kChunk;
}

// Starts the copy of global rows [0, kRows) x columns [0, kCols) (row stride ld elements) into a
// swizzled tile; rows >= valid_rows and columns >= valid_cols (a multiple of the chunk) become zeros.
template <int kRows, int kCols, int kThreads, typename T>
__device__ __forceinline__ void load_tile_async(T* tile, const T* g, int64_t ld, int valid_rows, int valid_cols) {
  constexpr int kChunk = 16 / sizeof(T);
  constexpr int kChunksPerRow = kCols / kChunk;
  constexpr int kChunks = kRows * kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "tile chunks must split evenly over the threads");
#pragma unroll
  for (int it = 0; it < kChunks / kThreads; ++it) {
    const int c = it * kThreads + threadIdx.x;
    const int r = c / kChunksPerRow, ch = c % kChunksPerRow;
    const bool pred = r < valid_rows && ch * kChunk < valid_cols;
    cp_async_16(tile + swz<kCols, kChunk>(r, ch), pred ? g + r * ld + ch * kChunk : g, pred);
  }
}

// load_tile_async for a loop over [kRows, kCols] tiles of one matrix (the forward's K / V: consecutive
// tiles, load; the backward's Q / dO: load_rows): a thread's chunk column is the same in every pass
// (kThreads is a multiple of a row's chunks)
// and its rows lie kPass apart, so a whole tile costs kPasses 64-bit pointer steps and cp.async,
// and only a tile that ends past the last row tests each chunk's row (the loader's per-chunk
// offsets, bounds and selects had taken ~100 instructions per tile and warp).
template <int kRows, int kCols, int kThreads, typename T>
struct TileStream {
  static constexpr int kChunk = 16 / sizeof(T), kChunksPerRow = kCols / kChunk;
  static constexpr int kPass = kThreads / kChunksPerRow, kPasses = kRows / kPass;
  static_assert(kThreads % kChunksPerRow == 0 && kRows % kPass == 0, "whole passes of whole rows");
  const T* g;         // this thread's first chunk of the next tile (column 0 when !col_ok)
  int64_t off;        // that chunk's offset from the tile's first element
  int64_t pass_step;  // kPass rows
  int row0, chunk;
  bool col_ok;        // the chunk is below valid_cols (zero-filled otherwise)

  // rows: the matrix's first row; ld its row stride (elements); columns >= valid_cols become zeros.
  __device__ __forceinline__ TileStream(const T* rows, int64_t ld, int valid_cols)
      : row0(threadIdx.x / kChunksPerRow), chunk(threadIdx.x % kChunksPerRow) {
    col_ok = chunk * kChunk < valid_cols;
    off = row0 * ld + (col_ok ? chunk * kChunk : 0);
    g = rows + off;
    pass_step = kPass * ld;
  }
  // The tile whose first row is `rows` (same row stride), wherever it lies.
  __device__ __forceinline__ void load_rows(T* tile, const T* rows, int valid_rows) {
    g = rows + off;
    load(tile, valid_rows);
  }
  // Starts the copy of the next tile into `tile` (rows >= valid_rows become zeros) and moves on
  // by kRows rows.
  __device__ __forceinline__ void load(T* tile, int valid_rows) {
    const uint32_t dst = smem_addr(tile);
    const T* src = g;
    if (valid_rows >= kRows) {
#pragma unroll
      for (int it = 0; it < kPasses; ++it, src += pass_step)
        cp_async_16(dst + sizeof(T) * swz<kCols, kChunk>(row0 + it * kPass, chunk), src, col_ok);
    } else {
#pragma unroll
      for (int it = 0; it < kPasses; ++it, src += pass_step) {
        // Without pred nothing is read; the address given is the tile's first element (g - off).
        const bool pred = col_ok && row0 + it * kPass < valid_rows;
        cp_async_16(dst + sizeof(T) * swz<kCols, kChunk>(row0 + it * kPass, chunk), pred ? src : g - off, pred);
      }
    }
    g += kPasses * pass_step;
  }
};

// The general sm80 kernels stage a bias / mask whose rows are 4-byte aligned but not 16-byte
// aligned (a 16-bit bias at an even n_k off a multiple of 8, e.g. 1004; a mask at n_k % 4 == 0 off
// a multiple of 16, e.g. 1000) by 4-byte cp.async chunks instead of reading them element by element
// from global memory: kChunks4 instantiations of the staged general forward and backward kernels
// (16-bit only; the backward's bias-only and fragment-walk forms have none, such a bias takes the
// general form). Adds 12 kernels. A/B on an H200 (bf16, sm80 forced, n = 1004, two rounds; NOTES.md,
// GPU record 2026-11-29 17:52): full bias forward / backward d64 112 / 111 TFLOP/s against 22 / 45,
// d128 166 / 130 against 41 / 79. Picking the chunk at run time inside the existing staged kernels
// instead cost the aligned calls up to 10%.
constexpr bool kSm80StageChunks4 = true;
template <typename T>
constexpr bool stage_chunks4() { return kSm80StageChunks4 && sizeof(T) == 2; }

// The widest cp.async chunk (16 or 4 bytes; 0: none) in which a bias / mask of elem_bytes-byte
// elements at ptr (strides st, in elements) comes: unit key stride, and the base, the batch / head /
// query strides and n_k in whole chunks, so that every row of every tile starts on one and its valid
// keys end on one. A null ptr (no such tensor) takes any chunk (16).
inline int score_chunk_bytes(const void* ptr, const Strided4& st, int64_t n_k, int elem_bytes) {
  if (!ptr) return 16;
  auto whole = [&](int64_t bytes) {
    const int64_t chunk = bytes / elem_bytes;
    return (reinterpret_cast<uintptr_t>(ptr) % bytes) == 0 && st.b % chunk == 0 && st.h % chunk == 0 &&
           st.q % chunk == 0 && n_k % chunk == 0;
  };
  if (st.k != 1) return 0;
  if (whole(16)) return 16;
  return whole(4) ? 4 : 0;
}

// The chunk (16 or 4 bytes; 0: not stageable) in which the staged general kernels of element type T
// load the bias and mask of p (FwdParams or BwdParams): the narrower of the two, 4 only where the
// kChunks4 kernels exist (stage_chunks4).
template <typename T, typename Params>
int staged_chunk_bytes(const Params& p) {
  const int bias = score_chunk_bytes(p.bias, p.bias_s, p.n_k, sizeof(T));
  const int mask = score_chunk_bytes(p.mask, p.mask_s, p.n_k, 1);
  const int chunk = bias < mask ? bias : mask;
  return chunk == 4 && !stage_chunks4<T>() ? 0 : chunk;
}

// Rows [0, kRows) x columns [0, kCols) of a bias (T) or mask (uint8) at src (row stride row_stride,
// unit column stride) into an unswizzled shared tile [kRows][kLd] by cp.async chunks of kBytes (16,
// or 4 in the kChunks4 kernels); rows >= rows and columns >= cols (a multiple of the chunk) become
// zeros. A tensor broadcast over the rows (row_stride 0) loads its one row.
template <typename E, int kRows, int kCols, int kLd, int kThreads, int kBytes = 16>
__device__ __forceinline__ void load_score_tile(E* dst, const E* src, int64_t row_stride, int rows, int cols) {
  constexpr int kChunk = kBytes / sizeof(E), kChunks = kCols / kChunk;
  static_assert((kBytes == 16 || kBytes == 4) && kChunk >= 1, "16- or 4-byte chunks of whole elements");
  static_assert(kCols % kChunk == 0 && kLd % kChunk == 0, "whole, aligned chunks");
  const int n = (row_stride == 0 ? 1 : kRows) * kChunks;
  if constexpr (kBytes == 16) {
    for (int c = threadIdx.x; c < n; c += kThreads) {
      const int r = c / kChunks, k = (c % kChunks) * kChunk;
      const bool ok = r < rows && k < cols;
      cp_async_16(dst + r * kLd + k, ok ? src + r * row_stride + k : src, ok);
    }
  } else {
    // Rolled: four times the chunks, and the main loops' registers stay with the main loops.
#pragma unroll 1
    for (int c = threadIdx.x; c < n; c += kThreads) {
      const int r = c / kChunks, k = (c % kChunks) * kChunk;
      const bool ok = r < rows && k < cols;
      cp_async_4(dst + r * kLd + k, ok ? src + r * row_stride + k : src, ok);
    }
  }
}

// Per-lane ldmatrix addresses into a swizzled [rows, kCols] tile of 16-bit elements (a float tile
// of kCols / 2 columns has the same bytes: see kCols16). In every
// pattern below lane l reads row 16 R + rl and chunk 2 c + x, where rl % 8 == l % 8 and x is 0 or 1.
// Then the stored chunk (2 c + x) ^ (row % 8) = 8 (c / 4) + ((2 (c % 4) | x) ^ (l % 8)): four base
// addresses per lane, and R, c only add compile-time offsets (so an unrolled loop keeps 4
// registers per operand instead of one address per (R, c)).
template <int kCols>
struct SwzAddr {
  uint32_t base[4];
  __device__ __forceinline__ SwzAddr(const void* tile, int rl, int x) {
    const int lane = threadIdx.x % 32;
    const uint32_t t = smem_addr(tile) + rl * kCols * 2;
#pragma unroll
    for (int m = 0; m < 4; ++m) base[m] = t + ((((2 * m) | x) ^ (lane & 7)) << 4);
  }
  __device__ __forceinline__ uint32_t operator()(int R, int c) const {
    return base[c % 4] + R * 16 * kCols * 2 + (c / 4) * 128;
  }
  // The same addresses with chunk pairs counted from c0 (runtime): shifted(c0)(R, c) == (*this)(R, c0 + c).
  __device__ __forceinline__ SwzAddr shifted(int c0) const {
    SwzAddr r = *this;
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      const int k = (m + c0) & 3;
      r.base[m] = (k == 0 ? base[0] : k == 1 ? base[1] : k == 2 ? base[2] : base[3]) + ((m + c0) >> 2) * 128;
    }
    return r;
  }
};

// A operand (16x16) of a row-major tile: A[m][k] = tile[16 R + m][16 c + k].
template <int kCols>
__device__ __forceinline__ SwzAddr<kCols> ldsm_a_addr(const void* tile) {
  const int lane = threadIdx.x % 32;
  return SwzAddr<kCols>(tile, lane % 16, lane / 16);
}

// A operand (16x16) of a tile's transpose: A[m][k] = tile[16 R + k][16 c + m].
template <int kCols>
__device__ __forceinline__ SwzAddr<kCols> ldsm_a_trans_addr(const void* tile) {
  const int lane = threadIdx.x % 32;
  return SwzAddr<kCols>(tile, lane % 8 + (lane / 16) * 8, (lane / 8) % 2);
}

// B operands of two n-tiles, B[k][n] = tile[16 R + n][16 c + k] (e.g. K for S = Q K^T):
// regs 0..1 n-tile 2R, regs 2..3 n-tile 2R + 1.
template <int kCols>
__device__ __forceinline__ SwzAddr<kCols> ldsm_b_addr(const void* tile) {
  const int lane = threadIdx.x % 32;
  return SwzAddr<kCols>(tile, lane % 8 + (lane / 16) * 8, (lane / 8) % 2);
}

// B operands of two n-tiles, B[k][n] = tile[16 R + k][16 c + n] (e.g. V for O = P V), loaded with
// .trans: regs 0..1 n-tile 2c, regs 2..3 n-tile 2c + 1.
template <int kCols>
__device__ __forceinline__ SwzAddr<kCols> ldsm_b_trans_addr(const void* tile) {
  const int lane = threadIdx.x % 32;
  return SwzAddr<kCols>(tile, lane % 8 + ((lane / 8) % 2) * 8, lane / 16);
}

// The A operand of a 16x16 block from an accumulator tile (columns 16 kk ..), rounded to T.
template <typename T, int kN>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&s)[kN][4], int kk) {
  a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
  a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
  a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
  a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
}

// The kernels below are written once for T in {__half, __nv_bfloat16, float}. One mma step takes
// kMmaK<T> of the reduction dimension (m16n8k16; float: m16n8k8 on tf32), and the ldmatrix
// address patterns take a tile's width in 16-bit columns (kCols16<T, kCols>).
template <typename T>
constexpr int kMmaK = 32 / sizeof(T);
template <typename T, int kCols>
constexpr int kCols16 = kCols * static_cast<int>(sizeof(T)) / 2;

// One mma operand fragment: an A tile (16 x kMmaK) or the B tiles of two n-tiles (regs 0..1 and
// 2..3). 16-bit types keep the packed registers. float keeps each value as a pair of tf32 values
// x ~ hi + lo (|lo| <= 2^-11 |x|), and mma_frag adds a_hi b_hi + a_hi b_lo + a_lo b_hi: products
// to about 2^-20 relative, float32-level results (tf32 alone gives about 1e-3).
template <typename T>
struct Frag {
  uint32_t r[4];
  __device__ __forceinline__ void set(int i, uint32_t x) { r[i] = x; }
};
template <>
struct Frag<float> {
  uint32_t hi[4], lo[4];
  // hi: x plus half a tf32 ulp, masked to tf32 (round to nearest, ties away, as cvt.rna.tf32, which
  // ptxas emits as a compare, a predicated add and a mask); lo = x - hi as is: the tensor core
  // ignores its low 13 bits (lo truncated: 2^-21 |x| instead of 2^-22). An inf becomes NaN, as it
  // does in lo either way. Against two cvt.rna: forward 35 -> 49-52 TFLOP/s, backward 23-33 ->
  // 43-46 (H200), errors unchanged (benchmarks/f32_accuracy.py).
  __device__ __forceinline__ void set(int i, uint32_t x) {
    hi[i] = (x + 0x1000u) & 0xffffe000u;
    lo[i] = __float_as_uint(__uint_as_float(x) - __uint_as_float(hi[i]));
  }
};

// ldmatrix .x4 into a fragment (A of a row-major tile, or B of two n-tiles; the patterns above).
template <typename T>
__device__ __forceinline__ void ldsm_frag(Frag<T>& f, uint32_t addr) {
  if constexpr (sizeof(T) == 2) {
    ldmatrix_x4(f.r, addr);
  } else {
    uint32_t r[4];
    ldmatrix_x4(r, addr);
#pragma unroll
    for (int i = 0; i < 4; ++i) f.set(i, r[i]);
  }
}

// d += a b for n-tile `half` (0 or 1) of b.
template <typename T>
__device__ __forceinline__ void mma_frag(float (&d)[4], const Frag<T>& a, const Frag<T>& b, int half) {
  if constexpr (sizeof(T) == 2) {
    mma_m16n8k16<T>(d, a.r, b.r[2 * half], b.r[2 * half + 1]);
  } else {
    mma_m16n8k8_tf32(d, a.lo, b.hi[2 * half], b.hi[2 * half + 1]);
    mma_m16n8k8_tf32(d, a.hi, b.lo[2 * half], b.lo[2 * half + 1]);
    mma_m16n8k8_tf32(d, a.hi, b.hi[2 * half], b.hi[2 * half + 1]);
  }
}

// acc[m][2 np + half] += a[m] b (n-tile half of b) for every m-tile m: one B fragment (two
// n-tiles) read from shared memory feeds all of a thread's m-tiles.
template <typename T, int kM, int kN>
__device__ __forceinline__ void mma_tiles(float (&acc)[kM][kN][4], const Frag<T> (&a)[kM], const Frag<T>& b, int np) {
#pragma unroll
  for (int m = 0; m < kM; ++m) {
    mma_frag(acc[m][2 * np], a[m], b, 0);
    mma_frag(acc[m][2 * np + 1], a[m], b, 1);
  }
}

// acc[m] += A B^T over reduction step kk, both operands by ldmatrix from swizzled row-major tiles:
// A's m-tiles at a_addr(m, kk), B's n-tile pairs at b_addr(np, kk) (S = Q K^T in the forward,
// S^T = K Q^T and dP^T = V dO^T in the backward). No head-dim guard: padded columns are zeros.
template <typename T, int kM, int kN, int kCols>
__device__ __forceinline__ void mma_step(float (&acc)[kM][kN][4], const SwzAddr<kCols>& a_addr,
                                         const SwzAddr<kCols>& b_addr, int kk) {
  Frag<T> a[kM];
#pragma unroll
  for (int m = 0; m < kM; ++m) ldsm_frag(a[m], a_addr(m, kk));
#pragma unroll
  for (int np = 0; np < kN / 2; ++np) {
    Frag<T> b;
    ldsm_frag(b, b_addr(np, kk));
    mma_tiles(acc, a, b, np);
  }
}

// The tensor cores round their float sums toward zero, so an accumulator that takes a long
// reduction by mma alone drifts toward zero by about half an ulp per instruction: dK over 4,000
// queries came out 3e-5 off (H200), against float32's 1e-5 target. The float kernels therefore
// run their long reductions (O over the keys, dK / dV over the queries) in mma accumulators for
// kFlushK elements of the reduction at a time, then add them by round-to-nearest into partial
// sums kept in the thread's own elements of the (float32) output, and zero them (registers and
// shared memory are full). benchmarks/f32_accuracy.py on an H200 (GQA 8 / 2 heads, n 1k-8k,
// norm-wise relative error of out / dq / dk / dv): 1.2-2.4e-6 with 128, 1.2-3.2e-6 with 256
// (SDPA's EFFICIENT backend 0.6-1.0e-6, MATH 0.6-1.7e-6); the forward at d = 64 gained 0-5% from 256.
constexpr int kFlushK = 128;

// The A operand of reduction step kk from an accumulator tile (its columns kMmaK kk ..): 16-bit,
// rounded (acc_to_a). float: the accumulator's columns 2 (lane % 4) and + 1 are used as the
// fragment's columns lane % 4 and + 4, i.e. the step's reduction index k stands for column
// 2 (k % 4) + k / 4; the B operand must be read in that order too (PermRows32).
template <typename T, int kN>
__device__ __forceinline__ void acc_to_frag(Frag<T>& a, const float (&s)[kN][4], int kk) {
  if constexpr (sizeof(T) == 2) {
    acc_to_a<T>(a.r, s, kk);
  } else {
    a.set(0, __float_as_uint(s[kk][0]));
    a.set(1, __float_as_uint(s[kk][2]));
    a.set(2, __float_as_uint(s[kk][1]));
    a.set(3, __float_as_uint(s[kk][3]));
  }
}

// Scalar reads of a swizzled float tile [rows, kCols] (swz<kCols, 4>) at row 8 kk + 2 (lane % 4) + x
// and column c0 + 8 n + lane / 4, x in {0, 1}: the operand [k][n] = tile[8 kk + 2 (k % 4) + k / 4]
// [c0 + 8 n + n'] of a tf32 step whose reduction runs over the tile's rows in acc_to_frag's order
// (ldmatrix cannot transpose 32-bit elements). The 4 rows x 8 columns of one warp-wide read lie in
// 32 different banks. n < kN; n >= 4 needs c0 % 32 == 0 (the swizzle repeats every 32 columns).
template <int kCols, int kN>
struct PermRows32 {
  static constexpr int kB = kN < 4 ? kN : 4;
  uint32_t base[kB][2];
  __device__ __forceinline__ PermRows32(const float* tile, int c0) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int n = 0; n < kB; ++n)
#pragma unroll
      for (int x = 0; x < 2; ++x) {
        const int r = 2 * (lane % 4) + x, c = c0 + 8 * n + lane / 4;
        base[n][x] = smem_addr(tile + swz<kCols, 4>(r, c / 4) + c % 4);
      }
  }
  __device__ __forceinline__ uint32_t operator()(int kk, int n, int x) const {
    return base[n % kB][x] + (n / kB) * 128 + kk * 8 * kCols * 4;
  }
};

// B operands of two n-tiles read transposed from a swizzled [rows, kCols] tile, B[k][n] =
// tile[kMmaK kk + k][16 np + n] (V for O = P V, dO for dV = P^T dO, ...). 16-bit: ldmatrix .trans.
// float: PermRows32 (the reduction order of acc_to_frag).
template <typename T, int kCols>
struct TransB {
  SwzAddr<kCols> a;
  __device__ __forceinline__ explicit TransB(const T* tile) : a(ldsm_b_trans_addr<kCols>(tile)) {}
  __device__ __forceinline__ TransB(const SwzAddr<kCols>& s) : a(s) {}
  __device__ __forceinline__ TransB shifted(int c0) const { return TransB(a.shifted(c0)); }
  __device__ __forceinline__ void load(Frag<T>& b, int kk, int np) const { ldmatrix_x4_trans(b.r, a(kk, np)); }
};
template <int kCols>
struct TransB<float, kCols> {
  PermRows32<kCols, 4> a;
  // c0: the first column (a multiple of 32).
  __device__ __forceinline__ explicit TransB(const float* tile, int c0 = 0) : a(tile, c0) {}
  __device__ __forceinline__ void load(Frag<float>& b, int kk, int np) const {
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int x = 0; x < 2; ++x) b.set(2 * h + x, ld_shared_b32(a(kk, 2 * np + h, x)));
  }
};

// Two adjacent elements (the pair of an accumulator row) stored to global or shared memory, p 4-byte
// aligned (16-bit T) or 8-byte aligned (float).
template <typename T>
__device__ __forceinline__ void store2(T* p, float x, float y) {
  if constexpr (sizeof(T) == 2) {
    *reinterpret_cast<uint32_t*>(p) = pack2<T>(x, y);
  } else {
    *reinterpret_cast<float2*>(p) = make_float2(x, y);
  }
}

template <int kN>
__device__ __forceinline__ void zero_acc(float (&a)[kN][4]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) a[i][0] = a[i][1] = a[i][2] = a[i][3] = 0.f;
}

}  // namespace flash_mha::cuda
