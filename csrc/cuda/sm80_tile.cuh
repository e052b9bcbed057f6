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

// A operand (16x16, rows r0.., columns 16 kk..) of a row-major swizzled tile.
template <int kCols, typename T>
__device__ __forceinline__ void ldsm_a(uint32_t (&a)[4], const T* tile, int r0, int kk) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4(a, tile + swz<kCols>(r0 + lane % 16, 2 * kk + lane / 16));
}

// A operand (16x16) of the transpose of a swizzled tile: A[m][k] = tile[k0 + k][m0 + m], with
// m0 = 16 * mt and k0 = 16 * kk.
template <int kCols, typename T>
__device__ __forceinline__ void ldsm_a_trans(uint32_t (&a)[4], const T* tile, int mt, int kk) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4_trans(a, tile + swz<kCols>(16 * kk + lane % 8 + (lane / 16) * 8, 2 * mt + (lane / 8) % 2));
}

// B operands of two n-tiles (n = rows 16 np .. 16 np + 15 of the tile, k = columns 16 kk ..):
// B[k][n] = tile[n][k], e.g. K for S = Q K^T. b[0..1]: n-tile 2 np, b[2..3]: n-tile 2 np + 1.
template <int kCols, typename T>
__device__ __forceinline__ void ldsm_b(uint32_t (&b)[4], const T* tile, int np, int kk) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4(b, tile + swz<kCols>(16 * np + lane % 8 + (lane / 16) * 8, 2 * kk + (lane / 8) % 2));
}

// B operands of two n-tiles (n = columns 16 np .., k = rows 16 kk ..): B[k][n] = tile[k][n],
// e.g. V for O = P V. b[0..1]: n-tile 2 np, b[2..3]: n-tile 2 np + 1.
template <int kCols, typename T>
__device__ __forceinline__ void ldsm_b_trans(uint32_t (&b)[4], const T* tile, int np, int kk) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4_trans(b, tile + swz<kCols>(16 * kk + lane % 8 + ((lane / 8) % 2) * 8, 2 * np + lane / 16));
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
