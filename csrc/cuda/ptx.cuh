// One thin wrapper per PTX instruction used by the tensor-core kernels (sm_80 and newer).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace flash_mha::cuda {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// cp.async.cg.shared.global: 16 bytes global -> shared, bypassing L1. When !pred, the 16 bytes
// are zero-filled (src-size 0) and nothing is read from src.
__device__ __forceinline__ void cp_async_16(uint32_t smem, const void* gmem, bool pred) {
  const int src_size = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(src_size));
}
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool pred) {
  cp_async_16(smem_addr(smem), gmem, pred);
}

// cp.async.ca 4 bytes (cache at all levels; .cg takes 16 only); zero-fill when !pred.
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem, bool pred) {
  const int src_size = pred ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(src_size));
}

// cp.async.commit_group
__device__ __forceinline__ void cp_async_commit_group() { asm volatile("cp.async.commit_group;\n" ::); }

// cp.async.wait_group N: wait until at most N of this thread's committed groups are pending.
template <int N>
__device__ __forceinline__ void cp_async_wait_group() {
  static_assert(N >= 0 && N <= 7, "cp.async.wait_group takes 0..7");
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: four 8x8 b16 matrices; lane l gives the shared-space
// address of row l % 8 of matrix l / 8; thread t receives row t / 4, columns 2 (t % 4), +1 of each.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem));
}

// ldmatrix ... .trans: the same, each 8x8 matrix transposed.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem));
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32: d += a * b.
// a: 4 regs (16x16, row-major fragment), b: 2 regs (16x8, column fragment), d: 4 floats.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "mma m16n8k16: f16 or bf16");
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32: d += a * b on tf32 bit patterns (float bits;
// the tensor core ignores the low 13).
// a: 4 regs (16x8: rows lane / 4 (+8), columns lane % 4 (+4)), b: 2 regs (8x8: rows lane % 4 (+4),
// column lane / 4), d: 4 floats in the m16n8k16 accumulator layout.
__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ld.shared.b32 from a shared-memory address.
__device__ __forceinline__ uint32_t ld_shared_b32(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}

// ex2.approx.ftz.f32: 2^x (ex2(-inf) = +0).
__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// red.global.add.f32: *p += v, no return value.
__device__ __forceinline__ void red_add_f32(float* p, float v) {
  asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(p), "f"(v) : "memory");
}

// Predicated forms (the store / reduction happens iff pred): straight-line code where a C++ `if`
// around each element made the compiler branch and reconverge per element (sm90_bwd.cu: dbias).
__device__ __forceinline__ void red_add_f32_if(bool pred, float* p, float v) {
  asm volatile("{\n .reg .pred q;\n setp.ne.b32 q, %2, 0;\n @q red.global.add.f32 [%0], %1;\n}\n" ::"l"(p), "f"(v),
               "r"(static_cast<int>(pred))
               : "memory");
}
__device__ __forceinline__ void st_b16_if(bool pred, void* p, uint16_t v) {
  asm volatile("{\n .reg .pred q;\n setp.ne.b32 q, %2, 0;\n @q st.global.b16 [%0], %1;\n}\n" ::"l"(p), "h"(v),
               "r"(static_cast<int>(pred))
               : "memory");
}

// red.global.add.v2.f32 (sm_90+): p[0] += a, p[1] += b in one 8-byte reduction (p 8-byte aligned);
// two red.global.add.f32 before sm_90.
__device__ __forceinline__ void red_add_v2_f32(float* p, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.add.global.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(a), "f"(b) : "memory");
#else
  red_add_f32(p, a);
  red_add_f32(p + 1, b);
#endif
}

// red_add_v2_f32 iff pred, without a branch (the dQ adds of the sm80 backward).
__device__ __forceinline__ void red_add_v2_f32_if(bool pred, float* p, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("{\n .reg .pred q;\n setp.ne.b32 q, %3, 0;\n @q red.add.global.v2.f32 [%0], {%1, %2};\n}\n" ::"l"(p),
               "f"(a), "f"(b), "r"(static_cast<int>(pred))
               : "memory");
#else
  red_add_f32_if(pred, p, a);
  red_add_f32_if(pred, p + 1, b);
#endif
}

// red.add.v4.f32 of v at p (16-byte aligned) iff pred, without a branch.
__device__ __forceinline__ void red_add_v4_f32_if(bool pred, float* p, float4 v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("{\n .reg .pred q;\n setp.ne.b32 q, %5, 0;\n @q red.add.global.v4.f32 [%0], {%1, %2, %3, %4};\n}\n" ::"l"(p),
               "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w), "r"(static_cast<int>(pred))
               : "memory");
#else
  red_add_v2_f32_if(pred, p, v.x, v.y);
  red_add_v2_f32_if(pred, p + 2, v.z, v.w);
#endif
}

// 16-bit load from a shared-memory address (zero-extended).
__device__ __forceinline__ uint32_t ld_shared_u16(uint32_t addr) {
  uint16_t v;
  asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(v) : "r"(addr));
  return v;
}

// red.global.add.v4.f32 (sm_90+): p[0..3] += v in one 16-byte reduction (p 16-byte aligned); four
// red.global.add.f32 before sm_90.
__device__ __forceinline__ void red_add_v4_f32(float* p, float a, float b, float c, float d) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.add.global.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "f"(a), "f"(b), "f"(c), "f"(d)
               : "memory");
#else
  red_add_f32(p, a);
  red_add_f32(p + 1, b);
  red_add_f32(p + 2, c);
  red_add_f32(p + 3, d);
#endif
}

// Two floats -> one register of two 16-bit values (low half = x).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float x, float y) {
  if constexpr (std::is_same_v<T, __half>) {
    __half2 h = __floats2half2_rn(x, y);
    return *reinterpret_cast<uint32_t*>(&h);
  } else {
    __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
    return *reinterpret_cast<uint32_t*>(&h);
  }
}

// Flags between blocks (the deterministic dQ order of sm90_bwd.cu and sm80_bwd.cu). ld.acquire.gpu:
// later accesses of this thread see what the releasing thread wrote before its release;
// red.release.gpu.add: the writes before it are visible to whoever acquires the new value.
__device__ __forceinline__ int ld_acquire_gpu(const int* p) {
  int v = 0;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void red_release_gpu_add(int* p, int v) {
  asm volatile("red.release.gpu.global.add.s32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}

}  // namespace flash_mha::cuda
