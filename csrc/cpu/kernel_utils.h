// Element-wise pieces of the CPU attention kernel: dtype conversion, a vectorizable exp, and
// the score-tile epilogue (scale, bias, mask, causal) shared by the forward and the backward.
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "../flash_mha.h"
#include "../philox.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// One copy of each hot loop per instruction set; the loader picks the best at run time.
#define FMHA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FMHA_CLONES
#endif

namespace flash_mha::cpu {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

constexpr float kInf = std::numeric_limits<float>::infinity();

// Sum and max over float arrays with 16 independent lanes: without -ffast-math the compiler may
// not reorder a plain reduction, so it would stay scalar; explicit lanes vectorize.
constexpr int kLanes = 16;

FMHA_CLONES inline float sum_lanes(const float* x, int64_t n) {
  float acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += x[j + l];
  float s = 0.f;
  for (; j < n; ++j) s += x[j];
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

// Row max. A NaN score may be skipped here; it still reaches the row sum through exp(NaN) and so
// makes the whole row NaN, as in the math definition.
FMHA_CLONES inline float max_lanes(const float* x, int64_t n, float init) {
  float acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = init;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] = x[j + l] > acc[l] ? x[j + l] : acc[l];
  float m = init;
  for (; j < n; ++j) m = x[j] > m ? x[j] : m;
  for (int l = 0; l < kLanes; ++l) m = acc[l] > m ? acc[l] : m;
  return m;
}

inline double sum_lanes(const double* x, int64_t n) {
  double s = 0.0;
  for (int64_t j = 0; j < n; ++j) s += x[j];
  return s;
}

inline double max_lanes(const double* x, int64_t n, double init) {
  double m = init;
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

// exp(t) for float, branch-free so that the loops below vectorize: t = k ln2 + r, |r| <= ln2/2, e^r
// by its Taylor series to r^6 (relative error ~1e-7, float32 rounding level), 2^k from the exponent
// bits. exp(-inf) = 0 and NaN stays NaN.
#if defined(__GNUC__)
__attribute__((always_inline))
#endif
inline float exp_poly(float t) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693145751953125f, kLn2Lo = 1.428606765330187e-06f;
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23: adding it drops a float's fraction bits
  const float xc = t < -87.f ? -87.f : (t > 88.f ? 88.f : t);
  const float kf = (xc * kLog2e + kRound) - kRound;  // round to nearest integer
  const float r = (xc - kf * kLn2Hi) - kf * kLn2Lo;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  int32_t bits = (static_cast<int32_t>(kf) + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &bits, sizeof(two_k));
  return t < -87.f ? 0.f : p * two_k;
}

// exp(x - shift) in place.
FMHA_CLONES inline void exp_inplace(float* x, int64_t n, float shift) {
  for (int64_t j = 0; j < n; ++j) x[j] = exp_poly(x[j] - shift);
}

// exp(x - shift) in place, returning the sum: one pass, the sum in kLanes independent lanes.
FMHA_CLONES inline float exp_inplace_sum(float* x, int64_t n, float shift) {
  float acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const float e = exp_poly(x[j + l] - shift);
      x[j + l] = e;
      acc[l] += e;
    }
  float s = 0.f;
  for (; j < n; ++j) {
    x[j] = exp_poly(x[j] - shift);
    s += x[j];
  }
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  return s;
}

inline void exp_inplace(double* x, int64_t n, double shift) {
  for (int64_t j = 0; j < n; ++j) x[j] = std::exp(x[j] - shift);
}

inline double exp_inplace_sum(double* x, int64_t n, double shift) {
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::exp(x[j] - shift);
    sum += x[j];
  }
  return sum;
}

// exp(s - shift) per row, where a row whose shift is +inf (no visible key) gives 0.
template <typename A>
inline void exp_rows(A* s, int64_t rows, int64_t cols, int64_t ld, const A* shift) {
  for (int64_t r = 0; r < rows; ++r) {
    if (shift[r] == std::numeric_limits<A>::infinity()) {
      std::fill(s + r * ld, s + r * ld + cols, A(0));
    } else {
      exp_inplace(s + r * ld, cols, shift[r]);
    }
  }
}

FMHA_CLONES inline void scale_row(float* x, int64_t n, float a) {
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}
inline void scale_row(double* x, int64_t n, double a) {
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}

// Rows [rows, cols] of a strided source (row stride ld, unit column stride) as a contiguous
// accumulator-type matrix. Float inputs are used in place (no copy): returns the pointer to read.
template <typename T, typename A>
inline const A* load_tile(const T* src, int64_t rows, int64_t cols, int64_t ld, std::vector<A>& buf,
                          int64_t& ld_out) {
  if constexpr (std::is_same_v<T, A>) {
    ld_out = ld;
    return src;
  } else {
    buf.resize(rows * cols);
    for (int64_t r = 0; r < rows; ++r) {
      const T* s = src + r * ld;
      A* d = buf.data() + r * cols;
      for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<A>(s[c]);
    }
    ld_out = cols;
    return buf.data();
  }
}

// Adds bias and applies mask/causal to a score tile S[rows, cols] (row stride ld) whose first
// element is score (i0, j0) of head (bi, hi). Invisible scores become -inf.
template <typename T, typename A>
inline void score_epilogue(const FwdParams& p, int64_t bi, int64_t hi, int64_t i0, int64_t j0, int64_t rows,
                           int64_t cols, A* S, int64_t ld) {
  const A neg_inf = -std::numeric_limits<A>::infinity();
  const int64_t shift = p.causal == Causal::kBottomRight ? p.n_k - p.n_q : 0;
  for (int64_t r = 0; r < rows; ++r) {
    A* s = S + r * ld;
    const int64_t i = i0 + r;
    if (p.bias) {
      const T* b = static_cast<const T*>(p.bias) + bi * p.bias_s.b + hi * p.bias_s.h + i * p.bias_s.q +
                   j0 * p.bias_s.k;
      const int64_t sk = p.bias_s.k;
      for (int64_t c = 0; c < cols; ++c) s[c] += static_cast<A>(b[c * sk]);
    }
    if (p.mask) {
      const uint8_t* m = p.mask + bi * p.mask_s.b + hi * p.mask_s.h + i * p.mask_s.q + j0 * p.mask_s.k;
      const int64_t sk = p.mask_s.k;
      for (int64_t c = 0; c < cols; ++c) s[c] = m[c * sk] ? s[c] : neg_inf;
    }
    if (p.causal != Causal::kNone) {
      const int64_t first_hidden = i + shift + 1 - j0;  // columns >= this are in the future
      for (int64_t c = first_hidden < 0 ? 0 : first_hidden; c < cols; ++c) s[c] = neg_inf;
    }
  }
}

// Multiplies a probability tile by keep/(1-p) (0 where dropped), in place. Each Philox call covers
// rows i, i + 8 (i % 16 < 8) and columns j, j + 1, j + 8, j + 9 (j % 16 < 8, even; philox.h), so
// rows are taken in those pairs and each call is drawn once for the elements of it the tile holds.
template <typename A>
inline void apply_dropout(const FwdParams& p, uint64_t seed, uint64_t offset, int64_t bi, int64_t hi,
                          int64_t i0, int64_t j0, int64_t rows, int64_t cols, A* P, int64_t ld) {
  const A keep_scale = A(1.0 / (1.0 - p.dropout_p));
  const uint64_t bh = static_cast<uint64_t>(bi * p.h + hi);
  const int64_t i_end = i0 + rows, j_end = j0 + cols;
  for (int64_t il = i0 & ~int64_t{15}; il < i_end; il += (il & 7) == 7 ? 9 : 1) {  // rows with bit 3 clear
    const bool lo = il >= i0, hi_row = il + 8 < i_end && il + 8 >= i0;
    if (!lo && !hi_row) continue;
    for (int64_t jb = j0 & ~int64_t{15}; jb < j_end; jb += 16)
      for (int64_t m = 0; m < 4; ++m) {
        const int64_t jl = jb + 2 * m;  // columns jl, jl + 1, jl + 8, jl + 9
        const bool any = (jl + 1 >= j0 && jl < j_end) || (jl + 9 >= j0 && jl + 8 < j_end);
        if (!any) continue;
        const Philox4 w = dropout_words(seed, offset, bh, static_cast<uint64_t>(il), static_cast<uint64_t>(jl));
        for (int64_t h = 0; h < 2; ++h) {
          if (!(h ? hi_row : lo)) continue;
          A* row = P + (il + 8 * h - i0) * ld - j0;
          for (int64_t u = 0; u < 2; ++u)
            for (int64_t e = 0; e < 2; ++e) {
              const int64_t j = jl + 8 * u + e;
              if (j < j0 || j >= j_end) continue;
              const uint32_t half = (w.x[2 * h + u] >> (16 * e)) & 0xFFFFu;
              row[j] = half >= p.dropout_threshold ? row[j] * keep_scale : A(0);
            }
        }
      }
  }
}

}  // namespace flash_mha::cpu
