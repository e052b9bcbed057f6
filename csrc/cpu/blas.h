// Row-major GEMM on the CPU through the BLAS that torch itself links (MKL or OpenBLAS export the
// Fortran symbols sgemm_/dgemm_), found with dlsym at first use. If no BLAS is exported, a plain
// loop keeps results right (only slower). Kernels see raw pointers only.
#pragma once
#include <cstdint>

namespace flash_mha::cpu {

// C[M,N] = alpha * op(A) * op(B) + beta * C, all row-major with leading dims lda/ldb/ldc.
// op(A) is [M,K] (A stored [K,M] when trans_a), op(B) is [K,N] (B stored [N,K] when trans_b).
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
          const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, double alpha,
          const double* A, int64_t lda, const double* B, int64_t ldb, double beta, double* C, int64_t ldc);

// Inside a parallel region every task calls the BLAS on one thread: a BLAS that opened its own
// nested thread team per small tile product would spend its time in barriers. RAII: sets the
// calling thread's BLAS thread count to 1 (MKL's per-thread setting) and restores it.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas();
  ~SingleThreadedBlas();
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int previous_ = 0;
};

// True when a BLAS was found (reported by flash_mha.cpu_blas_available(), for the benchmark).
bool have_blas();

}  // namespace flash_mha::cpu
