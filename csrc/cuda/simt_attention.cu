// SIMT attention (no tensor cores): the reference-accurate CUDA path for float64 and float32
// (accumulation in double / float, no tf32) and the fallback for every float16/bfloat16 case the
// tensor-core path does not take. Any head dims d, d_v in [1, 256]; bias, mask, causal, dropout, GQA.
//
// Forward: one block per (batch, head, 16-query tile); K and V tiles of 32 keys stream through one
//   shared buffer; online softmax (natural-log domain, exact exp).
// Backward, deterministic by construction (no atomics):
//   1. D = rowsum(dO * O)                               (one warp per row)
//   2. dK, dV: one block per (batch, kv head, 16 keys), looping over the group's query heads and
//      query tiles; recomputes P from lse.
//   3. dQ (+ dbias): one block per (batch, head, 16-query tile), looping over key tiles; when dbias
//      is broadcast over batch / heads / queries, a block loops over those too, so every dbias
//      element is summed by one thread in a fixed order.
#include <algorithm>

#include "common.cuh"
#include "kernels.h"

namespace flash_mha::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kRowThreads = 8;   // threads sharing one query (or key) row
constexpr int kFwdBQ = 16;       // queries per forward / dQ block  (= kThreads / kRowThreads)
constexpr int kFwdBK = 32;       // keys per tile: 8 threads x 4 adjacent keys
constexpr int kKvBK = 16;        // keys per dK/dV block
constexpr int kKvBQ = 16;        // queries per dK/dV inner tile: 8 threads x 2 adjacent keys
static_assert(kThreads / kRowThreads == kFwdBQ && kFwdBK == 4 * kRowThreads, "forward tile mapping");
static_assert(kThreads / kRowThreads == kKvBK && kKvBQ * kKvBK == 2 * kThreads, "dK/dV tile mapping");

// Output columns per thread: column c = l8 + 8 * k for k < kAcc. kAcc = 8 covers dims <= 64,
// kAcc = 32 covers dims <= 256.
int acc_for(int64_t dim) { return dim <= 8 * kRowThreads ? 8 : 32; }

template <typename T, typename A>
__device__ __forceinline__ void load_rows(A* dst, int ld, const T* src, int64_t src_ld, int rows, int valid_rows,
                                          int cols) {
  for (int e = threadIdx.x; e < rows * cols; e += kThreads) {
    const int r = e / cols, c = e - r * cols;
    dst[r * ld + c] = r < valid_rows ? to_acc<A>(src[r * src_ld + c]) : A(0);
  }
}

// 8-thread reductions within one row group (lanes 8g .. 8g+7 of a warp).
template <typename A> __device__ __forceinline__ A group_max(A x) {
#pragma unroll
  for (int o = 1; o < kRowThreads; o <<= 1) x = max(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
template <typename A> __device__ __forceinline__ A group_sum(A x) {
#pragma unroll
  for (int o = 1; o < kRowThreads; o <<= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Score of (i, j) before softmax, or -inf when invisible. dot = q_i . k_j.
template <typename T, typename A>
__device__ __forceinline__ A score(const FwdParams& p, int64_t bi, int64_t hi, int64_t i, int64_t j, A dot,
                                   bool in_range, int64_t shift) {
  bool vis = in_range && causal_visible(p.causal, i, j, shift);
  if (vis && p.mask) vis = p.mask[offset4(p.mask_s, bi, hi, i, j)] != 0;
  if (!vis) return -inf_of<A>();
  A s = dot * A(p.scale);
  if (p.bias) s += to_acc<A>(static_cast<const T*>(p.bias)[offset4(p.bias_s, bi, hi, i, j)]);
  return s;
}

// ---------------------------------------------------------------------------------------------
// Forward
template <typename T, int kAcc>
__global__ void __launch_bounds__(kThreads) simt_fwd_kernel(const FwdParams p) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int d = static_cast<int>(p.d), dv = static_cast<int>(p.d_v);
  const int ldkv = (d > dv ? d : dv) + 1;  // +1: keys in one warp hit different banks
  A* Qs = reinterpret_cast<A*>(smem_raw);  // [kFwdBQ, d]
  A* KVs = Qs + kFwdBQ * d;                // [kFwdBK, ldkv]: the K tile, then the V tile
  A* Ps = KVs + kFwdBK * ldkv;             // [kFwdBQ, kFwdBK] probabilities (dropped)

  const int64_t n_qb = (p.n_q + kFwdBQ - 1) / kFwdBQ;
  int64_t blk = blockIdx.x;
  const int64_t qb = blk % n_qb;
  blk /= n_qb;
  const int64_t hi = blk % p.h, bi = blk / p.h;
  const int64_t kvh = hi / (p.h / p.h_kv);
  const int64_t i0 = qb * kFwdBQ;
  const int rows = static_cast<int>(imin(kFwdBQ, p.n_q - i0));
  const int tid = threadIdx.x, r = tid / kRowThreads, l8 = tid % kRowThreads;
  const int64_t i = i0 + r;
  const bool row_ok = r < rows;
  const int64_t shift = causal_shift(p);
  const uint64_t bh = static_cast<uint64_t>(bi * p.h + hi);
  Dropout drop;
  drop.init(p);
  const A keep_scale = A(1.0 / (1.0 - p.dropout_p));

  const T* q = static_cast<const T*>(p.q) + bi * p.q_sb + hi * p.q_sh + i0 * p.q_sn;  // [rows, d]
  const T* k = static_cast<const T*>(p.k) + bi * p.k_sb + kvh * p.k_sh;              // [n_k, d]
  const T* v = static_cast<const T*>(p.v) + bi * p.v_sb + kvh * p.v_sh;              // [n_k, d_v]
  load_rows<T, A>(Qs, d, q, p.q_sn, kFwdBQ, rows, d);

  A m = -inf_of<A>(), l = A(0);
  A acc[kAcc];
#pragma unroll
  for (int c = 0; c < kAcc; ++c) acc[c] = A(0);

  const int64_t key_end = visible_key_end(p, i0, rows);
  for (int64_t j0 = 0; j0 < key_end; j0 += kFwdBK) {
    const int cols = static_cast<int>(imin(kFwdBK, key_end - j0));
    __syncthreads();  // the previous V tile is consumed
    load_rows<T, A>(KVs, ldkv, k + j0 * p.k_sn, p.k_sn, kFwdBK, cols, d);
    __syncthreads();
    A s[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int jj = 4 * l8 + c;
      A dot = A(0);
      for (int x = 0; x < d; ++x) dot += Qs[r * d + x] * KVs[jj * ldkv + x];
      s[c] = score<T, A>(p, bi, hi, i, j0 + jj, dot, row_ok && jj < cols, shift);
    }
    const A mx = group_max(max(max(s[0], s[1]), max(s[2], s[3])));
    const A m_new = max(m, mx);
    A alpha = A(1), rowsum = A(0);
    if (m_new != -inf_of<A>()) {
      alpha = exp_acc(m - m_new);  // exp(-inf) = 0 on the first visible tile
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        s[c] = exp_acc(s[c] - m_new);
        rowsum += s[c];
      }
    } else {
      // Nothing visible yet, or only NaN scores (max skips NaN): a NaN score must make the row
      // NaN, as in the math definition, so it is kept (and summed into l) rather than zeroed.
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        s[c] = s[c] != s[c] ? s[c] : A(0);
        rowsum += s[c];
      }
    }
    rowsum = group_sum(rowsum);
    l = l * alpha + rowsum;
    m = m_new;
    if (drop.on) {
      // Keys 4 l8 .. 4 l8 + 3: two column pairs, two calls (philox.h).
      const Philox4 w01 = drop.words(bh, i, j0 + 4 * l8), w23 = drop.words(bh, i, j0 + 4 * l8 + 2);
#pragma unroll
      for (int c = 0; c < 4; ++c)
        s[c] = drop.keep(c < 2 ? w01 : w23, i, j0 + 4 * l8 + c) ? s[c] * keep_scale : A(0);
    }
#pragma unroll
    for (int c = 0; c < 4; ++c) Ps[r * kFwdBK + 4 * l8 + c] = s[c];
#pragma unroll
    for (int c = 0; c < kAcc; ++c) acc[c] *= alpha;
    __syncthreads();  // K consumed, P written
    load_rows<T, A>(KVs, ldkv, v + j0 * p.v_sn, p.v_sn, kFwdBK, cols, dv);
    __syncthreads();
    for (int jj = 0; jj < cols; ++jj) {
      const A pj = Ps[r * kFwdBK + jj];
#pragma unroll
      for (int c = 0; c < kAcc; ++c) {
        const int col = l8 + kRowThreads * c;
        if (col < dv) acc[c] += pj * KVs[jj * ldkv + col];
      }
    }
  }

  if (!row_ok) return;
  const A inv = l == A(0) ? A(0) : A(1) / l;  // no visible key: zeros and lse = +inf
  T* o = static_cast<T*>(p.o) + bi * p.o_sb + hi * p.o_sh + i * p.o_sn;
#pragma unroll
  for (int c = 0; c < kAcc; ++c) {
    const int col = l8 + kRowThreads * c;
    if (col < dv) o[col] = from_acc<T>(acc[c] * inv);
  }
  if (l8 == 0) {
    A* lse = static_cast<A*>(p.lse) + (bi * p.h + hi) * p.n_q + i;
    *lse = l == A(0) ? inf_of<A>() : m + log_acc(l);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward 1: D[bh, i] = dO_i . O_i  (= sum_j P_ij dP_ij)
template <typename T>
__global__ void __launch_bounds__(kThreads) simt_dot_do_o_kernel(const BwdParams p, acc_t<T>* D) {
  using A = acc_t<T>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (row >= p.b * p.h * p.n_q) return;
  const int lane = threadIdx.x % 32;
  const int64_t i = row % p.n_q, bh = row / p.n_q, hi = bh % p.h, bi = bh / p.h;
  const T* o = static_cast<const T*>(p.o) + bi * p.o_sb + hi * p.o_sh + i * p.o_sn;
  const T* dout = static_cast<const T*>(p.dout) + bi * p.do_sb + hi * p.do_sh + i * p.do_sn;
  A acc = A(0);
  for (int64_t c = lane; c < p.d_v; c += 32) acc += to_acc<A>(o[c]) * to_acc<A>(dout[c]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) D[row] = acc;
}

// ---------------------------------------------------------------------------------------------
// Backward 2: dK, dV for 16 keys of one kv head; sums over the group's query heads.
template <typename T, int kAcc>
__global__ void __launch_bounds__(kThreads) simt_dkdv_kernel(const BwdParams p, const acc_t<T>* D) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int d = static_cast<int>(p.d), dv = static_cast<int>(p.d_v);
  const int ldk = d + 1, ldv = dv + 1;
  A* Ks = reinterpret_cast<A*>(smem_raw);  // [kKvBK, ldk]
  A* Vs = Ks + kKvBK * ldk;                // [kKvBK, ldv]
  A* Qs = Vs + kKvBK * ldv;                // [kKvBQ, d]
  A* dOs = Qs + kKvBQ * d;                 // [kKvBQ, dv]
  A* PZs = dOs + kKvBQ * dv;               // [kKvBQ, kKvBK]  P * Z (dropped, rescaled)
  A* dSs = PZs + kKvBQ * kKvBK;            // [kKvBQ, kKvBK]  dS
  A* lse_s = dSs + kKvBQ * kKvBK;          // [kKvBQ]
  A* D_s = lse_s + kKvBQ;                  // [kKvBQ]

  const int64_t n_kb = (p.n_k + kKvBK - 1) / kKvBK;
  int64_t blk = blockIdx.x;
  const int64_t kb = blk % n_kb;
  blk /= n_kb;
  const int64_t kvh = blk % p.h_kv, bi = blk / p.h_kv;
  const int64_t group = p.h / p.h_kv;
  const int64_t j0 = kb * kKvBK;
  const int cols = static_cast<int>(imin(kKvBK, p.n_k - j0));
  const int tid = threadIdx.x, r = tid / kRowThreads, l8 = tid % kRowThreads;  // r: key row (accumulators)
  const int64_t shift = causal_shift(p);
  Dropout drop;
  drop.init(p);
  const A keep_scale = A(1.0 / (1.0 - p.dropout_p));

  load_rows<T, A>(Ks, ldk, static_cast<const T*>(p.k) + bi * p.k_sb + kvh * p.k_sh + j0 * p.k_sn, p.k_sn,
                  kKvBK, cols, d);
  load_rows<T, A>(Vs, ldv, static_cast<const T*>(p.v) + bi * p.v_sb + kvh * p.v_sh + j0 * p.v_sn, p.v_sn,
                  kKvBK, cols, dv);
  A dK[kAcc], dV[kAcc];
#pragma unroll
  for (int c = 0; c < kAcc; ++c) dK[c] = dV[c] = A(0);

  const int64_t first_q = first_row_seeing(p, j0) / kKvBQ * kKvBQ;
  for (int64_t hi = kvh * group; hi < (kvh + 1) * group; ++hi) {
    const uint64_t bh = static_cast<uint64_t>(bi * p.h + hi);
    const A* lse_h = static_cast<const A*>(p.lse) + bh * p.n_q;
    const A* D_h = D + bh * p.n_q;
    for (int64_t i0 = first_q; i0 < p.n_q; i0 += kKvBQ) {
      const int rows = static_cast<int>(imin(kKvBQ, p.n_q - i0));
      __syncthreads();  // previous tile consumed
      load_rows<T, A>(Qs, d, static_cast<const T*>(p.q) + bi * p.q_sb + hi * p.q_sh + i0 * p.q_sn, p.q_sn,
                      kKvBQ, rows, d);
      load_rows<T, A>(dOs, dv, static_cast<const T*>(p.dout) + bi * p.do_sb + hi * p.do_sh + i0 * p.do_sn,
                      p.do_sn, kKvBQ, rows, dv);
      if (tid < kKvBQ) {
        lse_s[tid] = tid < rows ? lse_h[i0 + tid] : inf_of<A>();
        D_s[tid] = tid < rows ? D_h[i0 + tid] : A(0);
      }
      __syncthreads();
      // Scores: this thread takes query row iq = r and keys jj = 2*l8, 2*l8 + 1.
      const int iq = r;
      const int64_t i = i0 + iq;
      Philox4 w{};
      if (drop.on) w = drop.words(bh, i, j0 + 2 * l8);
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int jj = 2 * l8 + c;
        A qk = A(0), dp = A(0);
        for (int x = 0; x < d; ++x) qk += Qs[iq * d + x] * Ks[jj * ldk + x];
        for (int x = 0; x < dv; ++x) dp += dOs[iq * dv + x] * Vs[jj * ldv + x];
        const A s = score<T, A>(p, bi, hi, i, j0 + jj, qk, iq < rows && jj < cols, shift);
        const A P = s == -inf_of<A>() ? A(0) : exp_acc(s - lse_s[iq]);
        const A z = drop.on ? (drop.keep(w, i, j0 + jj) ? keep_scale : A(0)) : A(1);
        PZs[iq * kKvBK + jj] = P * z;
        dSs[iq * kKvBK + jj] = P * (dp * z - D_s[iq]);
      }
      __syncthreads();
      for (int x = 0; x < rows; ++x) {
        const A pz = PZs[x * kKvBK + r], ds = dSs[x * kKvBK + r];
#pragma unroll
        for (int c = 0; c < kAcc; ++c) {
          const int col = l8 + kRowThreads * c;
          if (col < dv) dV[c] += pz * dOs[x * dv + col];
          if (col < d) dK[c] += ds * Qs[x * d + col];
        }
      }
    }
  }
  if (r >= cols) return;
  T* dk = static_cast<T*>(p.dk) + ((bi * p.h_kv + kvh) * p.n_k + j0 + r) * p.d;
  T* dvp = static_cast<T*>(p.dv) + ((bi * p.h_kv + kvh) * p.n_k + j0 + r) * p.d_v;
  const A scale = A(p.scale);
#pragma unroll
  for (int c = 0; c < kAcc; ++c) {
    const int col = l8 + kRowThreads * c;
    if (col < d) dk[col] = from_acc<T>(dK[c] * scale);
    if (col < dv) dvp[col] = from_acc<T>(dV[c]);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward 3: dQ for 16 queries (and dbias). Task ranges let one block own every contribution to
// the dbias elements it touches: it loops over batches / heads / query tiles that dbias shares.
struct DqTasks {
  int64_t b_tasks, h_tasks, q_tasks, n_qb;
};

DqTasks dq_tasks(const BwdParams& p) {
  DqTasks t;
  t.n_qb = ceil_div(p.n_q, kFwdBQ);
  const bool db = p.dbias != nullptr;
  t.b_tasks = db && p.dbias_s.b == 0 ? 1 : p.b;
  t.h_tasks = db && p.dbias_s.h == 0 ? 1 : p.h;
  t.q_tasks = db && p.dbias_s.q == 0 ? 1 : t.n_qb;
  return t;
}

template <typename T, int kAcc>
__global__ void __launch_bounds__(kThreads)
    simt_dq_kernel(const BwdParams p, DqTasks t, const acc_t<T>* D, acc_t<T>* dbias_acc) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int d = static_cast<int>(p.d), dv = static_cast<int>(p.d_v);
  const int ldkv = (d > dv ? d : dv) + 1;
  A* Qs = reinterpret_cast<A*>(smem_raw);  // [kFwdBQ, d]
  A* dOs = Qs + kFwdBQ * d;                // [kFwdBQ, dv]
  A* KVs = dOs + kFwdBQ * dv;              // [kFwdBK, ldkv]: V tile, then K tile
  A* dSs = KVs + kFwdBK * ldkv;            // [kFwdBQ, kFwdBK]

  int64_t blk = blockIdx.x;
  const int64_t qt = blk % t.q_tasks;
  blk /= t.q_tasks;
  const int64_t ht = blk % t.h_tasks, bt = blk / t.h_tasks;
  const int64_t b_lo = t.b_tasks == 1 ? 0 : bt, b_hi = t.b_tasks == 1 ? p.b : bt + 1;
  const int64_t h_lo = t.h_tasks == 1 ? 0 : ht, h_hi = t.h_tasks == 1 ? p.h : ht + 1;
  const int64_t q_lo = t.q_tasks == 1 ? 0 : qt, q_hi = t.q_tasks == 1 ? t.n_qb : qt + 1;
  const int tid = threadIdx.x, r = tid / kRowThreads, l8 = tid % kRowThreads;
  const int64_t shift = causal_shift(p);
  const int64_t group = p.h / p.h_kv;
  Dropout drop;
  drop.init(p);
  const A keep_scale = A(1.0 / (1.0 - p.dropout_p));
  const bool db = dbias_acc != nullptr;
  // Distinct dbias elements of one [kFwdBQ, kFwdBK] score tile.
  const int db_rows = p.dbias_s.q ? kFwdBQ : 1, db_cols = p.dbias_s.k ? kFwdBK : 1;

  for (int64_t bi = b_lo; bi < b_hi; ++bi) {
    for (int64_t hi = h_lo; hi < h_hi; ++hi) {
      const int64_t kvh = hi / group;
      const uint64_t bh = static_cast<uint64_t>(bi * p.h + hi);
      const T* k = static_cast<const T*>(p.k) + bi * p.k_sb + kvh * p.k_sh;
      const T* v = static_cast<const T*>(p.v) + bi * p.v_sb + kvh * p.v_sh;
      for (int64_t qb = q_lo; qb < q_hi; ++qb) {
        const int64_t i0 = qb * kFwdBQ;
        const int rows = static_cast<int>(imin(kFwdBQ, p.n_q - i0));
        const int64_t i = i0 + r;
        const bool row_ok = r < rows;
        __syncthreads();
        load_rows<T, A>(Qs, d, static_cast<const T*>(p.q) + bi * p.q_sb + hi * p.q_sh + i0 * p.q_sn, p.q_sn,
                        kFwdBQ, rows, d);
        load_rows<T, A>(dOs, dv, static_cast<const T*>(p.dout) + bi * p.do_sb + hi * p.do_sh + i0 * p.do_sn,
                        p.do_sn, kFwdBQ, rows, dv);
        const A lse_i = row_ok ? static_cast<const A*>(p.lse)[bh * p.n_q + i] : inf_of<A>();
        const A D_i = row_ok ? D[bh * p.n_q + i] : A(0);
        A acc[kAcc];
#pragma unroll
        for (int c = 0; c < kAcc; ++c) acc[c] = A(0);

        const int64_t key_end = visible_key_end(p, i0, rows);
        for (int64_t j0 = 0; j0 < key_end; j0 += kFwdBK) {
          const int cols = static_cast<int>(imin(kFwdBK, key_end - j0));
          __syncthreads();  // previous K tile and dS consumed
          load_rows<T, A>(KVs, ldkv, v + j0 * p.v_sn, p.v_sn, kFwdBK, cols, dv);
          __syncthreads();
          A dp[4];
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int jj = 4 * l8 + c;
            A acc_dp = A(0);
            for (int x = 0; x < dv; ++x) acc_dp += dOs[r * dv + x] * KVs[jj * ldkv + x];
            dp[c] = acc_dp;
          }
          __syncthreads();  // V consumed
          load_rows<T, A>(KVs, ldkv, k + j0 * p.k_sn, p.k_sn, kFwdBK, cols, d);
          __syncthreads();
          Philox4 w01{}, w23{};  // keys 4 l8 .. 4 l8 + 3: two column pairs, two calls
          if (drop.on) {
            w01 = drop.words(bh, i, j0 + 4 * l8);
            w23 = drop.words(bh, i, j0 + 4 * l8 + 2);
          }
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int jj = 4 * l8 + c;
            A qk = A(0);
            for (int x = 0; x < d; ++x) qk += Qs[r * d + x] * KVs[jj * ldkv + x];
            const A s = score<T, A>(p, bi, hi, i, j0 + jj, qk, row_ok && jj < cols, shift);
            const A P = s == -inf_of<A>() ? A(0) : exp_acc(s - lse_i);
            const A z = drop.on ? (drop.keep(c < 2 ? w01 : w23, i, j0 + jj) ? keep_scale : A(0)) : A(1);
            dSs[r * kFwdBK + jj] = P * (dp[c] * z - D_i);
          }
          __syncthreads();
          for (int jj = 0; jj < cols; ++jj) {
            const A ds = dSs[r * kFwdBK + jj];
#pragma unroll
            for (int c = 0; c < kAcc; ++c) {
              const int col = l8 + kRowThreads * c;
              if (col < d) acc[c] += ds * KVs[jj * ldkv + col];
            }
          }
          if (db) {
            // Thread e owns dbias element e of this tile in every tile: a fixed summation order.
            for (int e = tid; e < db_rows * db_cols; e += kThreads) {
              const int er = e / db_cols, ec = e % db_cols;
              A sum = A(0);
              for (int rr = (db_rows == 1 ? 0 : er); rr < (db_rows == 1 ? rows : er + 1); ++rr)
                for (int cc = (db_cols == 1 ? 0 : ec); cc < (db_cols == 1 ? cols : ec + 1); ++cc)
                  sum += dSs[rr * kFwdBK + cc];
              if (er < rows && ec < cols) dbias_acc[offset4(p.dbias_s, bi, hi, i0 + er, j0 + ec)] += sum;
            }
          }
        }
        if (row_ok) {
          T* dq = static_cast<T*>(p.dq) + (bh * p.n_q + i) * p.d;
          const A scale = A(p.scale);
#pragma unroll
          for (int c = 0; c < kAcc; ++c) {
            const int col = l8 + kRowThreads * c;
            if (col < d) dq[col] = from_acc<T>(acc[c] * scale);
          }
        }
      }
    }
  }
}

template <typename T>
__global__ void simt_convert_kernel(T* dst, const acc_t<T>* src, int64_t n) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[e] = from_acc<T>(src[e]);
}

template <typename T>
struct SimtWorkspace {
  acc_t<T>* D;          // [b, h, n_q]
  acc_t<T>* dbias_acc;  // dbias's shape, or nullptr
  int64_t bytes;
  SimtWorkspace(const BwdParams& p, void* base) {
    using A = acc_t<T>;
    const int64_t d_bytes = align_up(p.b * p.h * p.n_q * static_cast<int64_t>(sizeof(A)), 256);
    const int64_t db_bytes = align_up(dbias_elems(p) * static_cast<int64_t>(sizeof(A)), 256);
    char* b = static_cast<char*>(base);
    D = reinterpret_cast<A*>(b);
    dbias_acc = p.dbias ? reinterpret_cast<A*>(b + d_bytes) : nullptr;
    bytes = d_bytes + db_bytes;
  }
};

template <typename T, int kAcc>
void fwd_launch(const FwdParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t ldkv = (p.d > p.d_v ? p.d : p.d_v) + 1;
  const int64_t smem = (kFwdBQ * p.d + kFwdBK * ldkv + kFwdBQ * kFwdBK) * static_cast<int64_t>(sizeof(A));
  const int64_t blocks = p.b * p.h * ceil_div(p.n_q, kFwdBQ);
  if (blocks == 0) return;
  allow_smem(simt_fwd_kernel<T, kAcc>, smem);
  simt_fwd_kernel<T, kAcc><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(p);
}

template <typename T, int kAcc>
void bwd_launch(const BwdParams& p, void* workspace, cudaStream_t stream) {
  using A = acc_t<T>;
  SimtWorkspace<T> ws(p, workspace);
  const int64_t rows = p.b * p.h * p.n_q;
  if (rows > 0) {
    simt_dot_do_o_kernel<T><<<static_cast<unsigned>(ceil_div(rows, kThreads / 32)), kThreads, 0, stream>>>(p, ws.D);
  }
  const int64_t kv_blocks = p.b * p.h_kv * ceil_div(p.n_k, kKvBK);
  if (kv_blocks > 0) {
    const int64_t smem = (kKvBK * (p.d + 1) + kKvBK * (p.d_v + 1) + kKvBQ * (p.d + p.d_v) +
                          2 * kKvBQ * kKvBK + 2 * kKvBQ) * static_cast<int64_t>(sizeof(A));
    allow_smem(simt_dkdv_kernel<T, kAcc>, smem);
    simt_dkdv_kernel<T, kAcc><<<static_cast<unsigned>(kv_blocks), kThreads, smem, stream>>>(p, ws.D);
  }
  const DqTasks t = dq_tasks(p);
  const int64_t dq_blocks = t.b_tasks * t.h_tasks * t.q_tasks;
  if (dq_blocks > 0 && p.n_q > 0) {
    const int64_t ldkv = (p.d > p.d_v ? p.d : p.d_v) + 1;
    const int64_t smem =
        (kFwdBQ * (p.d + p.d_v) + kFwdBK * ldkv + kFwdBQ * kFwdBK) * static_cast<int64_t>(sizeof(A));
    allow_smem(simt_dq_kernel<T, kAcc>, smem);
    simt_dq_kernel<T, kAcc><<<static_cast<unsigned>(dq_blocks), kThreads, smem, stream>>>(p, t, ws.D, ws.dbias_acc);
  }
  const int64_t nb = dbias_elems(p);
  if (nb > 0) {
    simt_convert_kernel<T><<<static_cast<unsigned>(std::min<int64_t>(ceil_div(nb, 256), 65536)), 256, 0, stream>>>(
        static_cast<T*>(p.dbias), ws.dbias_acc, nb);
  }
}

template <typename T>
void fwd_typed(const FwdParams& p, cudaStream_t stream) {
  if (acc_for(p.d > p.d_v ? p.d : p.d_v) == 8) return fwd_launch<T, 8>(p, stream);
  return fwd_launch<T, 32>(p, stream);
}

template <typename T>
void bwd_typed(const BwdParams& p, void* workspace, cudaStream_t stream) {
  if (acc_for(p.d > p.d_v ? p.d : p.d_v) == 8) return bwd_launch<T, 8>(p, workspace, stream);
  return bwd_launch<T, 32>(p, workspace, stream);
}

}  // namespace

void simt_fwd(const FwdParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case Dtype::kFloat64: return fwd_typed<double>(p, stream);
    case Dtype::kFloat32: return fwd_typed<float>(p, stream);
    case Dtype::kFloat16: return fwd_typed<__half>(p, stream);
    case Dtype::kBFloat16: return fwd_typed<__nv_bfloat16>(p, stream);
  }
}

int64_t simt_bwd_workspace_bytes(const BwdParams& p) {
  switch (p.dtype) {
    case Dtype::kFloat64: return SimtWorkspace<double>(p, nullptr).bytes;
    default: return SimtWorkspace<float>(p, nullptr).bytes;
  }
}

void simt_bwd(const BwdParams& p, void* workspace, cudaStream_t stream) {
  switch (p.dtype) {
    case Dtype::kFloat64: return bwd_typed<double>(p, workspace, stream);
    case Dtype::kFloat32: return bwd_typed<float>(p, workspace, stream);
    case Dtype::kFloat16: return bwd_typed<__half>(p, workspace, stream);
    case Dtype::kBFloat16: return bwd_typed<__nv_bfloat16>(p, workspace, stream);
  }
}

}  // namespace flash_mha::cuda
