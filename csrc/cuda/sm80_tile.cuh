// Shared-memory tiles of 16-bit elements for the tensor-core kernels: the XOR swizzle, the
// cp.async tile loader, and the ldmatrix address patterns of the mma.m16n8k16 operands.
#pragma once
#include "common.cuh"
#include "ptx.cuh"

namespace flash_mha::cuda {

// Element offset of (row, 8-element chunk) in a [rows, kCols] tile. Chunk c of row r is stored at
// chunk c ^ (r % 8): the 8 rows one ldmatrix phase reads then lie in 8 different 16-byte bank
// groups (a row of kCols >= 64 elements is >= 128 bytes, so without the XOR they would collide).
template <int kCols>
__device__ __forceinline__ int swz(int row, int chunk) {
  static_assert(kCols % 64 == 0, "swizzled tiles need rows of at least 8 chunks");
  return row * kCols + ((chunk ^ (row & 7)) << 3);
}

// Starts the copy of global rows [0, kRows) x columns [0, kCols) (row stride ld elements) into a
// swizzled tile; rows >= valid_rows and columns >= valid_cols (a multiple of 8) become zeros.
template <int kRows, int kCols, int kThreads, typename T>
__device__ __forceinline__ void load_tile_async(T* tile, const T* g, int64_t ld, int valid_rows, int valid_cols) {
  constexpr int kChunksPerRow = kCols / 8;
  constexpr int kChunks = kRows * kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "tile chunks must split evenly over the threads");
#pragma unroll
  for (int it = 0; it < kChunks / kThreads; ++it) {
    const int c = it * kThreads + threadIdx.x;
    const int r = c / kChunksPerRow, ch = c % kChunksPerRow;
    const bool pred = r < valid_rows && ch * 8 < valid_cols;
    cp_async_16(tile + swz<kCols>(r, ch), pred ? g + r * ld + ch * 8 : g, pred);
  }
}

// Per-lane ldmatrix addresses into a swizzled [rows, kCols] tile of 16-bit elements. In every
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

template <int kN>
__device__ __forceinline__ void zero_acc(float (&a)[kN][4]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) a[i][0] = a[i][1] = a[i][2] = a[i][3] = 0.f;
}

}  // namespace flash_mha::cuda
