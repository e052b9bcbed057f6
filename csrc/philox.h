// Counter-based RNG for dropout: Philox-4x32-7 (Salmon et al., "Parallel random numbers:
// as easy as 1, 2, 3", SC'11). The keep/drop decision for score (batch bi, query head hi,
// row i, column j) is a pure function of (seed, offset, bi*h + hi, i, j), so the backward
// regenerates the forward's mask without storing it, and CPU, CUDA and flash_mha/reference.py
// all draw the same mask. One Philox call yields four words = eight 16-bit halves, for the 8
// elements of a [16, 16] block of scores that one lane of a tensor-core fragment holds: rows i and
// i + 8 (i % 16 < 8), columns 2 m, 2 m + 1, 2 m + 8, 2 m + 9 (m = (j / 2) % 4) of its 16 columns.
// Element (i, j) takes the half j % 2 (low half for even j) of word 2 ((i / 8) % 2) + (j / 8) % 2
// and is kept iff that half >= the 16-bit threshold. So a forward lane (rows r, r + 8, columns
// 2 c + e of each 8-column n-tile) draws one call per pair of n-tiles and needs no other lane's.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FMHA_HD __host__ __device__ __forceinline__
#else
#define FMHA_HD inline
#endif

namespace flash_mha {

// Rounds: 7, the fewest the Philox paper finds to pass TestU01's BigCrush for Philox-4x32 (10 is its
// default, with a safety margin); FlashAttention-2's dropout draws 7 as well.
constexpr int kPhiloxRounds = 7;

struct Philox4 {
  uint32_t x[4];
};

FMHA_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

FMHA_HD Philox4 philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                           uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // round multipliers
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // Weyl key increments
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < kPhiloxRounds; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kM0, c0, hi0, lo0);
    mulhilo32(kM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
    k0 += kW0; k1 += kW1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The words of the call holding element (i, j) of head bh: counter (j without bits 0 and 3,
// i without bit 3, bh, offset), key seed.
FMHA_HD Philox4 dropout_words(uint64_t seed, uint64_t offset, uint64_t bh, uint64_t i, uint64_t j) {
  return philox4x32(static_cast<uint32_t>(((j >> 4) << 2) | ((j >> 1) & 3)),
                    static_cast<uint32_t>(((i >> 4) << 3) | (i & 7)), static_cast<uint32_t>(bh),
                    static_cast<uint32_t>(offset), static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Element (i, j)'s 16 bits of its call's words.
FMHA_HD uint32_t dropout_half(const Philox4& w, uint64_t i, uint64_t j) {
  return (w.x[2 * ((i >> 3) & 1) + ((j >> 3) & 1)] >> (16 * (j & 1))) & 0xFFFFu;
}

// Keep iff half >= threshold, threshold = floor(p * 2^16) (p in [0, 1): at most 2^16 - 1), so
// P(keep) = 1 - threshold / 2^16, within 2^-16 of 1 - p. (16 bits an element: one Philox call per
// eight elements, half the calls of 32-bit words; 8 bits, as FlashAttention takes, would round p
// to 1/256.)
inline uint32_t dropout_threshold(double p) {
  return static_cast<uint32_t>(p * 65536.0);
}

}  // namespace flash_mha
