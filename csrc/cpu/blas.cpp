#include "blas.h"

#include <dlfcn.h>

#include <climits>

namespace flash_mha::cpu {
namespace {

// Fortran BLAS, column-major, 32-bit integers (LP64), as exported by torch's bundled MKL.
using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                          const float*, const int*, const float*, const int*, const float*, float*,
                          const int*);
using dgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const double*,
                          const double*, const int*, const double*, const int*, const double*, double*,
                          const int*);

using set_threads_local_fn = int (*)(int);

struct Blas {
  sgemm_fn sgemm = nullptr;
  dgemm_fn dgemm = nullptr;
  set_threads_local_fn set_threads_local = nullptr;  // MKL_Set_Num_Threads_Local (C interface, by value), if present
  Blas() {
    sgemm = reinterpret_cast<sgemm_fn>(dlsym(RTLD_DEFAULT, "sgemm_"));
    dgemm = reinterpret_cast<dgemm_fn>(dlsym(RTLD_DEFAULT, "dgemm_"));
    set_threads_local = reinterpret_cast<set_threads_local_fn>(dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
    if (!sgemm || !dgemm) sgemm = nullptr, dgemm = nullptr;
  }
};

const Blas& blas() {
  static const Blas b;
  return b;
}

bool fits_int(int64_t x) { return x >= 0 && x <= INT_MAX; }

template <typename T>
void gemm_loop(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
               const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      T acc = 0;
      for (int64_t k = 0; k < K; ++k) {
        const T a = ta ? A[k * lda + m] : A[m * lda + k];
        const T b = tb ? B[n * ldb + k] : B[k * ldb + n];
        acc += a * b;
      }
      C[m * ldc + n] = alpha * acc + (beta == T(0) ? T(0) : beta * C[m * ldc + n]);
    }
  }
}

// Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap operands, keep the flags.
template <typename T, typename Fn>
void gemm_any(Fn fn, bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
              const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (fn && fits_int(M) && fits_int(N) && fits_int(K) && fits_int(lda) && fits_int(ldb) && fits_int(ldc) &&
      K > 0 && lda >= (ta ? M : K) && ldb >= (tb ? K : N) && ldc >= N) {
    // BLAS rejects a leading dim shorter than a row (stride-0 or size-1 rows); the loop takes any.
    const char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
    const int m = int(N), n = int(M), k = int(K), la = int(ldb), lb = int(lda), lc = int(ldc);
    fn(&cb, &ca, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  gemm_loop(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

}  // namespace

void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  gemm_any(blas().sgemm, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
          const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  gemm_any(blas().dgemm, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

SingleThreadedBlas::SingleThreadedBlas() {
  if (blas().set_threads_local) previous_ = blas().set_threads_local(1);
}

SingleThreadedBlas::~SingleThreadedBlas() {
  if (blas().set_threads_local) blas().set_threads_local(previous_);  // 0 restores the global setting
}

bool have_blas() { return blas().sgemm != nullptr; }

}  // namespace flash_mha::cpu
