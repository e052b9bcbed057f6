// Device helpers shared by every flash_mha CUDA kernel: element conversion, the visibility rule
// (mask + causal), bias reads, the dropout keep test, and small launch utilities.
// Everything here follows flash_mha/reference.py: S = scale * q.k + bias, invisible -> -inf,
// dropout keeps (i, j) iff its 16 Philox bits >= threshold and scales kept probabilities by 1 / (1 - p).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "../flash_mha.h"
#include "../philox.h"

namespace flash_mha::cuda {

// Accumulator type: double for double inputs, float for everything else.
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;

template <typename A> __device__ __forceinline__ A to_acc(double x) { return static_cast<A>(x); }
template <typename A> __device__ __forceinline__ A to_acc(float x) { return static_cast<A>(x); }
template <typename A> __device__ __forceinline__ A to_acc(__half x) { return static_cast<A>(__half2float(x)); }
template <typename A> __device__ __forceinline__ A to_acc(__nv_bfloat16 x) { return static_cast<A>(__bfloat162float(x)); }

template <typename T> __device__ __forceinline__ T from_acc(float x);
template <typename T> __device__ __forceinline__ T from_acc(double x);
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename A> __device__ __forceinline__ A inf_of();
template <> __device__ __forceinline__ float inf_of<float>() { return __int_as_float(0x7f800000); }
template <> __device__ __forceinline__ double inf_of<double>() { return __longlong_as_double(0x7ff0000000000000LL); }

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

// Query i sees key j by the causal rule (mask excluded). shift = n_k - n_q for bottom-right, else 0.
__device__ __forceinline__ bool causal_visible(Causal c, int64_t i, int64_t j, int64_t shift) {
  return c == Causal::kNone || j <= i + shift;
}

// Whether a softmax that takes the row maximum of the raw scores and folds the scale into the
// exponent (2^(s scale log2e - m): the sm80 plain kernels, the Hopper forward) can take this
// scale. It must be positive as a float and not subnormal (a masked score's -inf times a scale
// that is 0 in float, or flushed to 0, is NaN); above 1e30 the scaled maximum could overflow.
// Other scales go to the kernels that scale each score first.
inline bool scale_foldable(double scale) { return scale >= FLT_MIN && scale <= 1e30; }

__host__ __device__ __forceinline__ int64_t causal_shift(const FwdParams& p) {
  return p.causal == Causal::kBottomRight ? p.n_k - p.n_q : 0;
}

// Number of keys (from key 0) that any query in [i0, i0 + rows) can see by the causal rule.
__host__ __device__ __forceinline__ int64_t visible_key_end(const FwdParams& p, int64_t i0, int64_t rows) {
  if (p.causal == Causal::kNone) return p.n_k;
  int64_t e = i0 + rows + causal_shift(p);  // last row's last visible key + 1
  return e < 0 ? 0 : (e > p.n_k ? p.n_k : e);
}

// First query row that can see key j0 or a later key, by the causal rule.
__host__ __device__ __forceinline__ int64_t first_row_seeing(const FwdParams& p, int64_t j0) {
  if (p.causal == Causal::kNone) return 0;
  int64_t r = j0 - causal_shift(p);
  return r < 0 ? 0 : (r > p.n_q ? p.n_q : r);
}

// Element (bi, hi, i, j) of a broadcast [b, h, n_q, n_k] view.
__device__ __forceinline__ int64_t offset4(const Strided4& s, int64_t bi, int64_t hi, int64_t i, int64_t j) {
  return bi * s.b + hi * s.h + i * s.q + j * s.k;
}

// Dropout for one score: 1/(1-p) if kept, 0 if dropped.
struct Dropout {
  uint64_t seed = 0, offset = 0;
  uint32_t threshold = 0;
  float keep_scale = 1.f;
  bool on = false;

  __device__ __forceinline__ void init(const FwdParams& p) {
    on = p.dropout_p > 0.0;
    if (on) {
      seed = static_cast<uint64_t>(p.rng[0]);
      offset = static_cast<uint64_t>(p.rng[1]);
    }
    threshold = p.dropout_threshold;
    keep_scale = static_cast<float>(1.0 / (1.0 - p.dropout_p));
  }
  // The words of the call holding element (i, j) of head bh (= bi * h + hi); philox.h.
  __device__ __forceinline__ Philox4 words(uint64_t bh, int64_t i, int64_t j) const {
    return dropout_words(seed, offset, bh, static_cast<uint64_t>(i), static_cast<uint64_t>(j));
  }
  // Whether element (i, j) is kept, from the words of its call.
  __device__ __forceinline__ bool keep(const Philox4& w, int64_t i, int64_t j) const {
    return dropout_half(w, static_cast<uint64_t>(i), static_cast<uint64_t>(j)) >= threshold;
  }
  // Whether the low / high half of a word is kept (high: word >= threshold * 2^16).
  __device__ __forceinline__ bool keep_lo(uint32_t word) const { return (word << 16) >= (threshold << 16); }
  __device__ __forceinline__ bool keep_hi(uint32_t word) const { return word >= (threshold << 16); }
};

// Dropout with no bias and no mask or a key mask (constant along the queries): the shapes the
// Hopper plain kernels take with their dropout draws (kFwdDropoutPlain, kBwdDropoutPlain).
__host__ __device__ inline bool dropout_alone(const FwdParams& p) {
  return p.dropout_p > 0.0 && !p.bias && (!p.mask || p.mask_s.q == 0 || p.n_q <= 1);
}

// Whether the Hopper kernels can stage the bias tiles in shared memory with TMA (a rank-4 map
// [b, h, n_q, n_k] of the bias whose broadcast dims have size 1, read at coordinate 0; a
// query-broadcast bias is a map of one row, read at row 0). TMA needs a unit key stride, the other
// strides multiples of 16 bytes (8 elements) and a 16-byte aligned base. The sm90 forward sends
// other bias layouts to sm80; the sm90 backward stages at d = 128 only (d = 64 has no shared
// memory left) and sends them to sm80 there too. Host and device decide alike.
__host__ __device__ inline bool bias_tma_ok(const FwdParams& p) {
  const Strided4& s = p.bias_s;
  return p.bias && s.k == 1 && s.q >= 0 && s.h >= 0 && s.b >= 0 && s.q % 8 == 0 && s.h % 8 == 0 && s.b % 8 == 0 &&
         (reinterpret_cast<uintptr_t>(p.bias) & 15) == 0;
}

// dbias (the backward's bias gradient, strides dbias_s: 0 along the bias's broadcast dims).
// Whether some element is reached by more than one (block, iteration, thread) of a backward whose
// blocks own (batch, kv head, key block) and walk the query heads of their group.
__host__ __device__ inline bool dbias_shared(const BwdParams& p) {
  const Strided4& s = p.dbias_s;
  return p.dbias && ((s.b == 0 && p.b > 1) || (s.q == 0 && p.n_q > 1) || (s.k == 0 && p.n_k > 1) ||
                     (s.h == 0 && p.h_kv > 1));
}

// Elements of dbias (the bias's shape: 1 along its broadcast dims); 0 without a dbias.
__host__ __device__ inline int64_t dbias_elems(const BwdParams& p) {
  if (!p.dbias) return 0;
  const Strided4& s = p.dbias_s;
  return (s.b ? p.b : 1) * (s.h ? p.h : 1) * (s.q ? p.n_q : 1) * (s.k ? p.n_k : 1);
}

// Whether every dbias element is produced once: not shared, and not broadcast over the query heads
// of a GQA group (one block walks them all and adds them up).
__host__ __device__ inline bool dbias_once(const BwdParams& p) {
  return p.dbias && !dbias_shared(p) && !(p.dbias_s.h == 0 && p.h > 1);
}

namespace {
// dst[e] = src[e] * scale in T (float accumulators to the output dtype). 16-bit T with both
// pointers 16-byte aligned: 8 elements a thread per step (two 16-byte loads, one 16-byte store).
template <typename T>
__global__ void to_dtype_kernel(T* dst, const float* src, int64_t n, float scale = 1.f) {
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int64_t done = 0;
  if constexpr (sizeof(T) == 2) {
    if (((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) & 15) == 0) {
      const int64_t n8 = n / 8;
      for (int64_t v = first; v < n8; v += step) {
        const float4 a = reinterpret_cast<const float4*>(src)[2 * v];
        const float4 b = reinterpret_cast<const float4*>(src)[2 * v + 1];
        auto pack = [&](float x, float y) {
          const T lo = from_acc<T>(x * scale), hi = from_acc<T>(y * scale);
          const uint32_t l = *reinterpret_cast<const uint16_t*>(&lo), h = *reinterpret_cast<const uint16_t*>(&hi);
          return l | h << 16;
        };
        reinterpret_cast<uint4*>(dst)[v] = make_uint4(pack(a.x, a.y), pack(a.z, a.w), pack(b.x, b.y), pack(b.z, b.w));
      }
      done = n8 * 8;
    }
  }
  for (int64_t e = done + first; e < n; e += step) dst[e] = from_acc<T>(src[e] * scale);
}
}  // namespace

__host__ __device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t align_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

}  // namespace flash_mha::cuda
