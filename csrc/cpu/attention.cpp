// CPU attention: the FlashAttention algorithm on the CPU.
// Forward: parallel over (batch, head, query block); each task streams key/value blocks, keeps a
// running row max m and row sum l (online softmax), and rescales its output accumulator, so the
// [n_q, n_k] score matrix never exists: memory is O(block) per thread. Saves lse = m + log(l).
// Backward: recomputes P = exp(S - lse) tile by tile. Tasks own (batch, kv head, key chunk) and
// accumulate dK/dV for their keys; dQ goes to one float buffer per key chunk, summed afterwards in
// a fixed order; dbias is written by exactly one task per element. Everything is deterministic.
#include <ATen/Parallel.h>

#include <algorithm>

#include "blas.h"
#include "kernel_utils.h"

namespace flash_mha::cpu {
namespace {

// Tile sizes: a [kBlockQ, kBlockK] float score tile plus K/V blocks stay within L2 for d <= 256.
constexpr int64_t kFwdBlockQ = 128, kFwdBlockK = 512;
constexpr int64_t kBwdBlockQ = 64, kBwdBlockK = 128;

int64_t causal_shift(const FwdParams& p) { return p.causal == Causal::kBottomRight ? p.n_k - p.n_q : 0; }

// Number of keys (from 0) that any query in rows [i0, i0 + rows) can see.
int64_t visible_keys(const FwdParams& p, int64_t i0, int64_t rows) {
  if (p.causal == Causal::kNone) return p.n_k;
  return std::clamp<int64_t>(i0 + rows - 1 + causal_shift(p) + 1, 0, p.n_k);
}

// First query row that can see key j0 or later.
int64_t first_row_seeing(const FwdParams& p, int64_t j0) {
  if (p.causal == Causal::kNone) return 0;
  return std::clamp<int64_t>(j0 - causal_shift(p), 0, p.n_q);
}

void rng_words(const FwdParams& p, uint64_t& seed, uint64_t& offset) {
  seed = p.rng ? static_cast<uint64_t>(p.rng[0]) : 0;
  offset = p.rng ? static_cast<uint64_t>(p.rng[1]) : 0;
}

template <typename T>
void fwd_typed(const FwdParams& p) {
  using A = acc_t<T>;
  const int64_t n_qblocks = (p.n_q + kFwdBlockQ - 1) / kFwdBlockQ;
  const int64_t group = p.h / p.h_kv;
  uint64_t seed, offset;
  rng_words(p, seed, offset);
  at::parallel_for(0, p.b * p.h * n_qblocks, 1, [&](int64_t begin, int64_t end) {
    const SingleThreadedBlas one_thread;
    std::vector<A> qbuf, kbuf, vbuf, S(kFwdBlockQ * kFwdBlockK), O(kFwdBlockQ * p.d_v);
    std::vector<A> m(kFwdBlockQ), l(kFwdBlockQ), alpha(kFwdBlockQ);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % n_qblocks, hi = (task / n_qblocks) % p.h, bi = task / (n_qblocks * p.h);
      const int64_t kvh = hi / group;
      const int64_t i0 = qb * kFwdBlockQ, rows = std::min(kFwdBlockQ, p.n_q - i0);
      const T* q = static_cast<const T*>(p.q) + bi * p.q_sb + hi * p.q_sh + i0 * p.q_sn;
      const T* k = static_cast<const T*>(p.k) + bi * p.k_sb + kvh * p.k_sh;
      const T* v = static_cast<const T*>(p.v) + bi * p.v_sb + kvh * p.v_sh;
      int64_t ldq, ldk, ldv;
      const A* Q = load_tile<T, A>(q, rows, p.d, p.q_sn, qbuf, ldq);  // [rows, d]
      std::fill(m.begin(), m.end(), -std::numeric_limits<A>::infinity());
      std::fill(l.begin(), l.end(), A(0));
      std::fill(O.begin(), O.end(), A(0));
      const int64_t n_keys = visible_keys(p, i0, rows);
      for (int64_t j0 = 0; j0 < n_keys; j0 += kFwdBlockK) {
        const int64_t cols = std::min(kFwdBlockK, n_keys - j0);
        const A* K = load_tile<T, A>(k + j0 * p.k_sn, cols, p.d, p.k_sn, kbuf, ldk);    // [cols, d]
        const A* V = load_tile<T, A>(v + j0 * p.v_sn, cols, p.d_v, p.v_sn, vbuf, ldv);  // [cols, d_v]
        // S = scale * Q K^T, then bias / mask / causal.
        gemm(false, true, rows, cols, p.d, A(p.scale), Q, ldq, K, ldk, A(0), S.data(), kFwdBlockK);
        score_epilogue<T, A>(p, bi, hi, i0, j0, rows, cols, S.data(), kFwdBlockK);
        for (int64_t r = 0; r < rows; ++r) {
          A* s = S.data() + r * kFwdBlockK;
          const A mx = max_lanes(s, cols, m[r]);
          if (mx == -std::numeric_limits<A>::infinity()) {
            // Either nothing visible yet in this row, or every score so far is NaN (the max skips
            // NaN): a NaN row must come out NaN, as in the math definition, not as an empty row.
            if (std::any_of(s, s + cols, [](A x) { return x != x; })) {
              m[r] = l[r] = alpha[r] = std::numeric_limits<A>::quiet_NaN();
              scale_row(O.data() + r * p.d_v, p.d_v, alpha[r]);
              continue;  // the NaN scores stay in S and make this row's O NaN
            }
            std::fill(s, s + cols, A(0));
            alpha[r] = A(1);
            continue;
          }
          // exp(m_old - m_new) rescales what was accumulated; exp(-inf) = 0 on the first block.
          alpha[r] = std::exp(m[r] - mx);
          const A rowsum = exp_inplace_sum(s, cols, mx);
          l[r] = l[r] * alpha[r] + rowsum;
          m[r] = mx;
          if (alpha[r] != A(1)) scale_row(O.data() + r * p.d_v, p.d_v, alpha[r]);
        }
        if (p.dropout_p > 0.0) apply_dropout(p, seed, offset, bi, hi, i0, j0, rows, cols, S.data(), kFwdBlockK);
        gemm(false, false, rows, p.d_v, cols, A(1), S.data(), kFwdBlockK, V, ldv, A(1), O.data(), p.d_v);
      }
      T* o = static_cast<T*>(p.o) + bi * p.o_sb + hi * p.o_sh + i0 * p.o_sn;
      A* lse = static_cast<A*>(p.lse) + (bi * p.h + hi) * p.n_q + i0;
      for (int64_t r = 0; r < rows; ++r) {
        const bool empty = l[r] == A(0);  // no visible key: zeros, lse = +inf
        const A inv = empty ? A(0) : A(1) / l[r];
        for (int64_t c = 0; c < p.d_v; ++c) o[r * p.o_sn + c] = static_cast<T>(O[r * p.d_v + c] * inv);
        lse[r] = empty ? std::numeric_limits<A>::infinity() : m[r] + std::log(l[r]);
      }
    }
  });
}

// D[bh, i] = sum_c dO[i, c] * O[i, c]  (= sum_j P_ij dP_ij, the softmax-backward row term).
template <typename T>
void dot_do_o(const BwdParams& p, std::vector<acc_t<T>>& D) {
  using A = acc_t<T>;
  at::parallel_for(0, p.b * p.h, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t bi = bh / p.h, hi = bh % p.h;
      const T* o = static_cast<const T*>(p.o) + bi * p.o_sb + hi * p.o_sh;
      const T* dout = static_cast<const T*>(p.dout) + bi * p.do_sb + hi * p.do_sh;
      for (int64_t i = 0; i < p.n_q; ++i) {
        A acc = 0;
        for (int64_t c = 0; c < p.d_v; ++c)
          acc += static_cast<A>(o[i * p.o_sn + c]) * static_cast<A>(dout[i * p.do_sn + c]);
        D[bh * p.n_q + i] = acc;
      }
    }
  });
}

template <typename T>
void bwd_typed(const BwdParams& p) {
  using A = acc_t<T>;
  const int64_t group = p.h / p.h_kv;
  const int64_t n_kblocks = (p.n_k + kBwdBlockK - 1) / kBwdBlockK;
  uint64_t seed, offset;
  rng_words(p, seed, offset);

  std::vector<A> D(p.b * p.h * p.n_q);
  dot_do_o<T>(p, D);

  // Task layout. A task loops over every batch (head) when dbias is shared across batches (heads),
  // and over every key block when dbias is shared across keys, so no two tasks add to one element.
  const bool db = p.dbias != nullptr;
  const int64_t b_tasks = db && p.dbias_s.b == 0 ? 1 : p.b;
  const int64_t kvh_tasks = db && p.dbias_s.h == 0 ? 1 : p.h_kv;
  const int64_t threads = at::get_num_threads();
  int64_t chunks = std::clamp<int64_t>((2 * threads + b_tasks * kvh_tasks - 1) / (b_tasks * kvh_tasks), 1, n_kblocks);
  if (db && p.dbias_s.k == 0) chunks = 1;
  const int64_t blocks_per_chunk = (n_kblocks + chunks - 1) / chunks;
  chunks = (n_kblocks + blocks_per_chunk - 1) / blocks_per_chunk;

  const int64_t dq_elems = p.b * p.h * p.n_q * p.d;
  std::vector<A> dq_acc(chunks * dq_elems, A(0));  // [chunk, b, h, n_q, d]
  std::vector<A> dbias_acc;
  int64_t dbias_elems = 0;
  if (db) {
    dbias_elems = (p.dbias_s.b ? p.b : 1) * (p.dbias_s.h ? p.h : 1) * (p.dbias_s.q ? p.n_q : 1) *
                  (p.dbias_s.k ? p.n_k : 1);
    dbias_acc.assign(dbias_elems, A(0));
  }

  at::parallel_for(0, b_tasks * kvh_tasks * chunks, 1, [&](int64_t begin, int64_t end) {
    const SingleThreadedBlas one_thread;
    std::vector<A> qbuf, kbuf, vbuf, dobuf, PZ;
    std::vector<A> S(kBwdBlockQ * kBwdBlockK), dP(kBwdBlockQ * kBwdBlockK);
    std::vector<A> dK(kBwdBlockK * p.d), dV(kBwdBlockK * p.d_v);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t chunk = task % chunks;
      const int64_t kt = (task / chunks) % kvh_tasks, bt = task / (chunks * kvh_tasks);
      const int64_t b_lo = b_tasks == 1 ? 0 : bt, b_hi = b_tasks == 1 ? p.b : bt + 1;
      const int64_t kv_lo = kvh_tasks == 1 ? 0 : kt, kv_hi = kvh_tasks == 1 ? p.h_kv : kt + 1;
      const int64_t kb_lo = chunk * blocks_per_chunk, kb_hi = std::min(n_kblocks, kb_lo + blocks_per_chunk);
      A* dq_chunk = dq_acc.data() + chunk * dq_elems;
      for (int64_t bi = b_lo; bi < b_hi; ++bi) {
        for (int64_t kvh = kv_lo; kvh < kv_hi; ++kvh) {
          for (int64_t kb = kb_lo; kb < kb_hi; ++kb) {
            const int64_t j0 = kb * kBwdBlockK, cols = std::min(kBwdBlockK, p.n_k - j0);
            int64_t ldk, ldv, ldq, ldo;
            const T* k = static_cast<const T*>(p.k) + bi * p.k_sb + kvh * p.k_sh + j0 * p.k_sn;
            const T* v = static_cast<const T*>(p.v) + bi * p.v_sb + kvh * p.v_sh + j0 * p.v_sn;
            const A* K = load_tile<T, A>(k, cols, p.d, p.k_sn, kbuf, ldk);    // [cols, d]
            const A* V = load_tile<T, A>(v, cols, p.d_v, p.v_sn, vbuf, ldv);  // [cols, d_v]
            std::fill(dK.begin(), dK.end(), A(0));
            std::fill(dV.begin(), dV.end(), A(0));
            for (int64_t hi = kvh * group; hi < (kvh + 1) * group; ++hi) {
              const A* lse_h = static_cast<const A*>(p.lse) + (bi * p.h + hi) * p.n_q;
              const A* D_h = D.data() + (bi * p.h + hi) * p.n_q;
              const int64_t first_q = first_row_seeing(p, j0) / kBwdBlockQ * kBwdBlockQ;
              for (int64_t i0 = first_q; i0 < p.n_q; i0 += kBwdBlockQ) {
                const int64_t rows = std::min(kBwdBlockQ, p.n_q - i0);
                const T* q = static_cast<const T*>(p.q) + bi * p.q_sb + hi * p.q_sh + i0 * p.q_sn;
                const T* dout = static_cast<const T*>(p.dout) + bi * p.do_sb + hi * p.do_sh + i0 * p.do_sn;
                const A* Q = load_tile<T, A>(q, rows, p.d, p.q_sn, qbuf, ldq);           // [rows, d]
                const A* dO = load_tile<T, A>(dout, rows, p.d_v, p.do_sn, dobuf, ldo);  // [rows, d_v]
                // P = exp(scale * Q K^T + bias - lse), 0 where invisible.
                gemm(false, true, rows, cols, p.d, A(p.scale), Q, ldq, K, ldk, A(0), S.data(), kBwdBlockK);
                score_epilogue<T, A>(p, bi, hi, i0, j0, rows, cols, S.data(), kBwdBlockK);
                exp_rows(S.data(), rows, cols, kBwdBlockK, lse_h + i0);
                // dP = dO V^T
                gemm(false, true, rows, cols, p.d_v, A(1), dO, ldo, V, ldv, A(0), dP.data(), kBwdBlockK);
                if (p.dropout_p > 0.0) {
                  // With Z = keep / (1 - p): dV += (P*Z)^T dO and dP <- dP * Z; P itself stays
                  // undropped for dS = P * (dP - D).
                  apply_dropout(p, seed, offset, bi, hi, i0, j0, rows, cols, dP.data(), kBwdBlockK);
                  PZ.assign(S.begin(), S.begin() + rows * kBwdBlockK);
                  apply_dropout(p, seed, offset, bi, hi, i0, j0, rows, cols, PZ.data(), kBwdBlockK);
                  gemm(true, false, cols, p.d_v, rows, A(1), PZ.data(), kBwdBlockK, dO, ldo, A(1), dV.data(), p.d_v);
                } else {
                  gemm(true, false, cols, p.d_v, rows, A(1), S.data(), kBwdBlockK, dO, ldo, A(1), dV.data(), p.d_v);
                }
                // dS = P * (dP - D), stored over dP.
                for (int64_t r = 0; r < rows; ++r) {
                  const A* pr = S.data() + r * kBwdBlockK;
                  A* dpr = dP.data() + r * kBwdBlockK;
                  const A Di = D_h[i0 + r];
                  for (int64_t c = 0; c < cols; ++c) dpr[c] = pr[c] * (dpr[c] - Di);
                }
                if (db) {
                  A* dbias = dbias_acc.data();
                  for (int64_t r = 0; r < rows; ++r) {
                    A* dst = dbias + bi * p.dbias_s.b + hi * p.dbias_s.h + (i0 + r) * p.dbias_s.q + j0 * p.dbias_s.k;
                    const A* src = dP.data() + r * kBwdBlockK;
                    for (int64_t c = 0; c < cols; ++c) dst[c * p.dbias_s.k] += src[c];
                  }
                }
                // dK += scale * dS^T Q ;  dQ += scale * dS K
                gemm(true, false, cols, p.d, rows, A(p.scale), dP.data(), kBwdBlockK, Q, ldq, A(1), dK.data(), p.d);
                A* dq = dq_chunk + ((bi * p.h + hi) * p.n_q + i0) * p.d;
                gemm(false, false, rows, p.d, cols, A(p.scale), dP.data(), kBwdBlockK, K, ldk, A(1), dq, p.d);
              }
            }
            T* dk = static_cast<T*>(p.dk) + ((bi * p.h_kv + kvh) * p.n_k + j0) * p.d;
            T* dv = static_cast<T*>(p.dv) + ((bi * p.h_kv + kvh) * p.n_k + j0) * p.d_v;
            for (int64_t e = 0; e < cols * p.d; ++e) dk[e] = static_cast<T>(dK[e]);
            for (int64_t e = 0; e < cols * p.d_v; ++e) dv[e] = static_cast<T>(dV[e]);
          }
        }
      }
    }
  });

  // dQ = sum of the per-chunk partials, in chunk order.
  at::parallel_for(0, dq_elems, 4096, [&](int64_t begin, int64_t end) {
    T* dq = static_cast<T*>(p.dq);
    for (int64_t e = begin; e < end; ++e) {
      A acc = 0;
      for (int64_t c = 0; c < chunks; ++c) acc += dq_acc[c * dq_elems + e];
      dq[e] = static_cast<T>(acc);
    }
  });
  if (db) {
    T* dbias = static_cast<T*>(p.dbias);
    for (int64_t e = 0; e < dbias_elems; ++e) dbias[e] = static_cast<T>(dbias_acc[e]);
  }
}

}  // namespace
}  // namespace flash_mha::cpu

namespace flash_mha {

void cpu_fwd(const FwdParams& p) {
  switch (p.dtype) {
    case Dtype::kFloat64: return cpu::fwd_typed<double>(p);
    case Dtype::kFloat32: return cpu::fwd_typed<float>(p);
    case Dtype::kFloat16: return cpu::fwd_typed<c10::Half>(p);
    case Dtype::kBFloat16: return cpu::fwd_typed<c10::BFloat16>(p);
  }
}

void cpu_bwd(const BwdParams& p) {
  switch (p.dtype) {
    case Dtype::kFloat64: return cpu::bwd_typed<double>(p);
    case Dtype::kFloat32: return cpu::bwd_typed<float>(p);
    case Dtype::kFloat16: return cpu::bwd_typed<c10::Half>(p);
    case Dtype::kBFloat16: return cpu::bwd_typed<c10::BFloat16>(p);
  }
}

}  // namespace flash_mha
