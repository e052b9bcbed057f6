// One thin wrapper per Hopper (sm_90a) PTX instruction used by sm90_fwd.cu and sm90_bwd.cu:
// mbarriers, TMA (cp.async.bulk.tensor) tile loads, 1-d bulk copies and bulk reduce-adds, wgmma shared-memory
// descriptors, wgmma fence / commit / wait, wgmma m64nNk16 (f32 accumulators, bf16/f16 operands;
// SS = both operands in shared memory, RS = A in registers, SS_TT = both operands MN-major),
// setmaxnreg, fence.proxy.async.
//
// Every body is guarded by FLASH_MHA_SM90_ENABLED: the build compiles each .cu for sm_80 and
// sm_90a, and on every target but sm_90a these functions compile to nothing (the sm90 kernel is
// never launched there: dispatch.cu checks the device first).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "ptx.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FLASH_MHA_SM90_ENABLED 1
#else
#define FLASH_MHA_SM90_ENABLED 0
#endif

namespace flash_mha::cuda::sm90 {

// ---------------------------------------------------------------------------------------------
// mbarrier (64-bit shared-memory barrier with a phase bit and a transaction-byte count)

// mbarrier.init.shared::cta.b64: `count` arrivals complete a phase.
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t count) {
#if FLASH_MHA_SM90_ENABLED
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
#endif
}

// fence.mbarrier_init.release.cluster: makes initialized barriers visible to the async proxy (TMA).
__device__ __forceinline__ void fence_barrier_init() {
#if FLASH_MHA_SM90_ENABLED
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

// mbarrier.arrive.expect_tx: one arrival, and the phase also waits for `bytes` transaction bytes
// (the TMA loads that name this barrier count their bytes down).
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#if FLASH_MHA_SM90_ENABLED
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
#endif
}

// mbarrier.arrive.shared::cta.b64: one arrival.
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
#if FLASH_MHA_SM90_ENABLED
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
#endif
}

// mbarrier.try_wait.parity: spins until the phase with parity `parity` has completed. A fresh
// barrier is in phase 0, so waiting for parity 1 returns at once ("the previous phase is done").
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
#if FLASH_MHA_SM90_ENABLED
  const uint32_t addr = smem_addr(bar);
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(addr), "r"(parity)
        : "memory");
  } while (!done);
#endif
}

// ---------------------------------------------------------------------------------------------
// TMA (cp.async.bulk.tensor): tensor maps are built on the host (cuTensorMapEncodeTiled) and
// passed as `const __grid_constant__ CUtensorMap` kernel parameters; `tmap` is its address.

// prefetch.tensormap: pulls the descriptor into the cache ahead of the first load.
__device__ __forceinline__ void tma_prefetch_desc(const void* tmap) {
#if FLASH_MHA_SM90_ENABLED
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(tmap)) : "memory");
#endif
}

// cp.async.bulk.prefetch.tensor.4d.L2.global.tile: the box at coordinates (c0 .. c3) into L2 only
// (a hint: nothing to wait for), so that a later tma_load_4d of it is an L2 hit.
__device__ __forceinline__ void tma_prefetch_l2_4d(const void* tmap, int c0, int c1, int c2, int c3) {
#if FLASH_MHA_SM90_ENABLED
  asm volatile("cp.async.bulk.prefetch.tensor.4d.L2.global.tile [%0, {%1, %2, %3, %4}];\n" ::"l"(
                   reinterpret_cast<uint64_t>(tmap)),
               "r"(c0), "r"(c1), "r"(c2), "r"(c3)
               : "memory");
#endif
}

// cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes: the box at
// coordinates (c0 innermost .. c3) of the 4-d tensor map into shared memory at `dst`; completion
// counts the box's bytes down on `bar`. Out-of-bounds elements are written as zeros.
__device__ __forceinline__ void tma_load_4d(void* dst, const void* tmap, uint64_t* bar, int c0, int c1, int c2,
                                            int c3) {
#if FLASH_MHA_SM90_ENABLED
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], "
      "[%2];\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(tmap)), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
#endif
}

// cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes: `bytes` contiguous bytes
// (a multiple of 16; both addresses 16-byte aligned) from global `src` into shared memory at
// `dst`; completion counts the bytes down on `bar` (used by sm90_bwd.cu for lse / D rows).
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
#if FLASH_MHA_SM90_ENABLED
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
               ::"r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar))
               : "memory");
#endif
}

// cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32: adds `bytes` contiguous float32 (a
// multiple of 16; both addresses 16-byte aligned) from shared memory at `src` to global `dst`,
// element by element, as one bulk operation of this thread's current bulk group (sm90_bwd.cu: dQ).
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, const void* src, uint32_t bytes) {
#if FLASH_MHA_SM90_ENABLED
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n"
               ::"l"(dst), "r"(smem_addr(src)), "r"(bytes)
               : "memory");
#endif
}

// cp.async.bulk.commit_group: closes this thread's current bulk group.
__device__ __forceinline__ void bulk_commit_group() {
#if FLASH_MHA_SM90_ENABLED
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
#endif
}

// cp.async.bulk.wait_group.read N: waits until at most N of this thread's bulk groups still read
// their shared-memory source (the source may then be overwritten).
template <int N>
__device__ __forceinline__ void bulk_wait_group_read() {
#if FLASH_MHA_SM90_ENABLED
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
#endif
}

// cp.async.bulk.wait_group N: waits until at most N of this thread's bulk groups are incomplete
// (their global writes performed).
template <int N>
__device__ __forceinline__ void bulk_wait_group() {
#if FLASH_MHA_SM90_ENABLED
  asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// fence.proxy.async.shared::cta: orders this thread's generic-proxy shared-memory accesses with
// later async-proxy ones (TMA, wgmma operand reads).
__device__ __forceinline__ void fence_proxy_async() {
#if FLASH_MHA_SM90_ENABLED
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// fence.proxy.async.global: orders this thread's async-proxy global accesses (a completed bulk
// reduce-add) with its generic-proxy ones (a release / acquire on a flag), both ways.
__device__ __forceinline__ void fence_proxy_async_global() {
#if FLASH_MHA_SM90_ENABLED
  asm volatile("fence.proxy.async.global;\n" ::: "memory");
#endif
}

// ---------------------------------------------------------------------------------------------
// Named barriers (bar.sync / bar.arrive on ids 1..15; id 0 is __syncthreads). `count` threads
// (a multiple of 32) complete the barrier; arrive adds this warp's threads without waiting.

__device__ __forceinline__ void named_barrier_sync(int id, int count) {
#if FLASH_MHA_SM90_ENABLED
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
#endif
}

__device__ __forceinline__ void named_barrier_arrive(int id, int count) {
#if FLASH_MHA_SM90_ENABLED
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
#endif
}

// ---------------------------------------------------------------------------------------------
// Register reallocation between warpgroups (needs a register cap at kernel entry:
// __launch_bounds__(threads, 1)). kRegs: a multiple of 8 in [24, 256].

template <int kRegs>
__device__ __forceinline__ void setmaxnreg_inc() {
  static_assert(kRegs % 8 == 0 && kRegs >= 24 && kRegs <= 256, "setmaxnreg: multiple of 8 in [24, 256]");
#if FLASH_MHA_SM90_ENABLED
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}

template <int kRegs>
__device__ __forceinline__ void setmaxnreg_dec() {
  static_assert(kRegs % 8 == 0 && kRegs >= 24 && kRegs <= 256, "setmaxnreg: multiple of 8 in [24, 256]");
#if FLASH_MHA_SM90_ENABLED
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}

// ---------------------------------------------------------------------------------------------
// wgmma shared-memory matrix descriptors (PTX ISA "Matrix Descriptor Format"):
//   bits  0-13: start address >> 4      bits 16-29: leading-dimension byte offset >> 4
//   bits 32-45: stride-dimension byte offset >> 4   bits 49-51: base offset (0: 1024-B aligned atoms)
//   bits 62-63: swizzle (1 = 128-byte)
//
// All tiles here use the 128-byte swizzle as TMA writes it: a "panel" of R rows x 64 16-bit
// elements (128 bytes a row), 16-byte chunk c of row r stored at chunk c ^ (r % 8); panels start
// 1024-byte aligned. A [R, 64 P] tile is P such panels one after another (panel stride R * 128 B).
//
// K-major operand (the reduction dim is the contiguous one: Q and K for S = Q K^T): 8-row groups
// are 1024 B apart (SBO); LBO is unused because one k16 step (32 B) stays inside a 128-B row.
// Step k (16 elements) of panel p starts at base + p * R * 128 + (k % 4) * 32 bytes.
__device__ __forceinline__ uint64_t desc_kmajor_sw128(uint32_t smem_byte_addr) {
  return static_cast<uint64_t>((smem_byte_addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(1) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

// MN-major operand (the output dim N is the contiguous one: V, [keys, d], as B of O += P V with
// the transpose bit set): along N, 64 elements per 128-B row, then the next panel LBO bytes later;
// along K (keys), 8-row groups 1024 B apart (SBO). Step k (16 keys) starts 16 * 128 B further.
__device__ __forceinline__ uint64_t desc_mnmajor_sw128(uint32_t smem_byte_addr, uint32_t panel_bytes) {
  return static_cast<uint64_t>((smem_byte_addr & 0x3FFFF) >> 4) |
         (static_cast<uint64_t>((panel_bytes >> 4) & 0x3FFF) << 16) | (static_cast<uint64_t>(1024 >> 4) << 32) |
         (static_cast<uint64_t>(1) << 62);
}

// The whole-tile GEMMs below build each operand's descriptor once and advance it by a constant per
// k step (one 32-bit add on the low word) instead of rebuilding it from the address every step:
// ncu put ~12% of the forward main loop's stall samples on that uniform-datapath arithmetic
// between the HGMMAs (NOTES.md, GPU record 2026-11-27 14:25, item 5). Same descriptor bits (the
// start-address field cannot carry: every address stays below 256 KiB). A/B (H200, 2026-11-27,
// benchmarks/results/H200-ab-flags-a6bab56.txt): forward and backward +0-2% alone.
constexpr bool kDescriptorAdvance = true;

// desc with its start address moved `bytes` (a multiple of 16) further: only bits 0-13 change,
// since shared-memory addresses stay below 2^18 (a block has at most 227 KiB).
__device__ __forceinline__ uint64_t desc_advance(uint64_t desc, uint32_t bytes) {
  const uint32_t lo = static_cast<uint32_t>(desc) + (bytes >> 4);
  return (desc & 0xFFFFFFFF00000000ull) | lo;
}

// ---------------------------------------------------------------------------------------------
// wgmma synchronisation

// wgmma.fence: orders register accesses to accumulators / A fragments before the next wgmma.
__device__ __forceinline__ void wgmma_fence() {
#if FLASH_MHA_SM90_ENABLED
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

// wgmma.commit_group: closes the group of wgmma issued since the last commit.
__device__ __forceinline__ void wgmma_commit_group() {
#if FLASH_MHA_SM90_ENABLED
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

// wgmma.wait_group N: waits until at most N committed groups are pending.
template <int N>
__device__ __forceinline__ void wgmma_wait_group() {
  static_assert(N >= 0 && N <= 7, "wgmma.wait_group takes 0..7");
#if FLASH_MHA_SM90_ENABLED
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

// wgmma_wait_group<N> that stays behind the code before it. ptxas schedules a wait_group at the top
// of its basic block, ahead of independent work that precedes it in the source (it does not see
// the wait's duration): in every forward kernel but one the softmax meant to run beside the
// in-flight P V ran after the wait (SASS: every MUFU.EX2 after the WARPGROUP.DEPBAR; checked by
// benchmarks/sass_overlap.py). A branch ends the block: `never` must be false at run time and the
// same in the whole warpgroup (wait_group is .aligned), e.g. n_k < 0; the arms differ (an asm
// comment) so that neither compiler merges them back into one block. Forward +2-3% (H200 A/B,
// benchmarks/results/H200-ab-wait-behind.txt).
constexpr bool kWaitBehind = true;  // false: a plain wgmma_wait_group (for an A/B)
template <int N>
__device__ __forceinline__ void wgmma_wait_group_behind(bool never) {
  if (!kWaitBehind) {
    wgmma_wait_group<N>();
  } else if (never) {
    asm volatile("// wgmma_wait_group_behind: never taken" ::: "memory");
    wgmma_wait_group<N>();
  } else {
    wgmma_wait_group<N>();
  }
}

// Keeps the compiler from moving accesses of accumulator registers across wgmma issue / wait
// points (the registers are read and written asynchronously in between).
template <int kN>
__device__ __forceinline__ void fence_regs(float (&d)[kN][4]) {
#pragma unroll
  for (int i = 0; i < kN; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[i][e])::"memory");
}
template <int kN>
__device__ __forceinline__ void fence_regs(uint32_t (&a)[kN][4]) {
#pragma unroll
  for (int i = 0; i < kN; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(a[i][e])::"memory");
}

// ---------------------------------------------------------------------------------------------
// wgmma.mma_async m64nNk16, f32 accumulators. One warpgroup (4 warps) issues it together; warp w
// holds rows 16 w .. 16 w + 15 of D in the mma.sync C layout per 8 columns:
//   d[nt][e]: row 16 w + lane / 4 + 8 (e / 2), column 8 nt + 2 (lane % 4) + e % 2,
// and (RS) the A fragment in the mma.sync m16n8k16 A layout. scale_d == 0: D = A B (D ignored).
// The explicit functions below differ only in N and the type suffix.

// D[64, 64] (+)= A[64, 16] (smem, K-major) * B[16, 64] (smem, K-major; B^T stored [64, 16]).
__device__ __forceinline__ void wgmma_m64n64k16_ss_bf16(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b, int scale_d) {
#if FLASH_MHA_SM90_ENABLED
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "%32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
#endif
}

// D[64, 64] (+)= A[64, 16] (registers, mma A-fragment layout) * B[16, 64] (smem, MN-major: [16, 64] rows).
__device__ __forceinline__ void wgmma_m64n64k16_rs_bf16(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
#if FLASH_MHA_SM90_ENABLED
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d));
#endif
}

// D[64, 64] (+)= A[64, 16] (smem, K-major) * B[16, 64] (smem, K-major; B^T stored [64, 16]).
__device__ __forceinline__ void wgmma_m64n64k16_ss_f16(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b, int scale_d) {
#if FLASH_MHA_SM90_ENABLED
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "%32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
#endif
}

// D[64, 64] (+)= A[64, 16] (registers, mma A-fragment layout) * B[16, 64] (smem, MN-major: [16, 64] rows).
__device__ __forceinline__ void wgmma_m64n64k16_rs_f16(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
#if FLASH_MHA_SM90_ENABLED
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "{%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d));
#endif
}

// D[64, 128] (+)= A[64, 16] (smem, K-major) * B[16, 128] (smem, K-major; B^T stored [128, 16]).
__device__ __forceinline__ void wgmma_m64n128k16_ss_bf16(float (&d)[16][4], uint64_t desc_a, uint64_t desc_b, int scale_d) {
#if FLASH_MHA_SM90_ENABLED
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
#endif
}

// D[64, 128] (+)= A[64, 16] (registers, mma A-fragment layout) * B[16, 128] (smem, MN-major: [16, 128] rows).
__device__ __forceinline__ void wgmma_m64n128k16_rs_bf16(float (&d)[16][4], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
#if FLASH_MHA_SM90_ENABLED
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d));
#endif
}

// D[64, 128] (+)= A[64, 16] (smem, K-major) * B[16, 128] (smem, K-major; B^T stored [128, 16]).
__device__ __forceinline__ void wgmma_m64n128k16_ss_f16(float (&d)[16][4], uint64_t desc_a, uint64_t desc_b, int scale_d) {
#if FLASH_MHA_SM90_ENABLED
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
#endif
}

// D[64, 128] (+)= A[64, 16] (registers, mma A-fragment layout) * B[16, 128] (smem, MN-major: [16, 128] rows).
__device__ __forceinline__ void wgmma_m64n128k16_rs_f16(float (&d)[16][4], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
#if FLASH_MHA_SM90_ENABLED
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d));
#endif
}

// D[64, 176] (+)= A[64, 16] (smem, K-major) * B[16, 176] (smem, K-major; B^T stored [176, 16]).
__device__ __forceinline__ void wgmma_m64n176k16_ss_bf16(float (&d)[22][4], uint64_t desc_a, uint64_t desc_b, int scale_d) {
#if FLASH_MHA_SM90_ENABLED
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %90, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n176k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87}, "
      "%88, %89, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3]), "+f"(d[16][0]), "+f"(d[16][1]), "+f"(d[16][2]), "+f"(d[16][3]), "+f"(d[17][0]), "+f"(d[17][1]), "+f"(d[17][2]), "+f"(d[17][3]), "+f"(d[18][0]), "+f"(d[18][1]), "+f"(d[18][2]), "+f"(d[18][3]), "+f"(d[19][0]), "+f"(d[19][1]), "+f"(d[19][2]), "+f"(d[19][3]), "+f"(d[20][0]), "+f"(d[20][1]), "+f"(d[20][2]), "+f"(d[20][3]), "+f"(d[21][0]), "+f"(d[21][1]), "+f"(d[21][2]), "+f"(d[21][3])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
#endif
}

// D[64, 176] (+)= A[64, 16] (smem, K-major) * B[16, 176] (smem, K-major; B^T stored [176, 16]).
__device__ __forceinline__ void wgmma_m64n176k16_ss_f16(float (&d)[22][4], uint64_t desc_a, uint64_t desc_b, int scale_d) {
#if FLASH_MHA_SM90_ENABLED
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %90, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n176k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87}, "
      "%88, %89, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3]), "+f"(d[16][0]), "+f"(d[16][1]), "+f"(d[16][2]), "+f"(d[16][3]), "+f"(d[17][0]), "+f"(d[17][1]), "+f"(d[17][2]), "+f"(d[17][3]), "+f"(d[18][0]), "+f"(d[18][1]), "+f"(d[18][2]), "+f"(d[18][3]), "+f"(d[19][0]), "+f"(d[19][1]), "+f"(d[19][2]), "+f"(d[19][3]), "+f"(d[20][0]), "+f"(d[20][1]), "+f"(d[20][2]), "+f"(d[20][3]), "+f"(d[21][0]), "+f"(d[21][1]), "+f"(d[21][2]), "+f"(d[21][3])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
#endif
}

// D[64, 192] (+)= A[64, 16] (smem, K-major) * B[16, 192] (smem, K-major; B^T stored [192, 16]).
__device__ __forceinline__ void wgmma_m64n192k16_ss_bf16(float (&d)[24][4], uint64_t desc_a, uint64_t desc_b, int scale_d) {
#if FLASH_MHA_SM90_ENABLED
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %98, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n192k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95}, "
      "%96, %97, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3]), "+f"(d[16][0]), "+f"(d[16][1]), "+f"(d[16][2]), "+f"(d[16][3]), "+f"(d[17][0]), "+f"(d[17][1]), "+f"(d[17][2]), "+f"(d[17][3]), "+f"(d[18][0]), "+f"(d[18][1]), "+f"(d[18][2]), "+f"(d[18][3]), "+f"(d[19][0]), "+f"(d[19][1]), "+f"(d[19][2]), "+f"(d[19][3]), "+f"(d[20][0]), "+f"(d[20][1]), "+f"(d[20][2]), "+f"(d[20][3]), "+f"(d[21][0]), "+f"(d[21][1]), "+f"(d[21][2]), "+f"(d[21][3]), "+f"(d[22][0]), "+f"(d[22][1]), "+f"(d[22][2]), "+f"(d[22][3]), "+f"(d[23][0]), "+f"(d[23][1]), "+f"(d[23][2]), "+f"(d[23][3])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
#endif
}

// D[64, 192] (+)= A[64, 16] (smem, K-major) * B[16, 192] (smem, K-major; B^T stored [192, 16]).
__device__ __forceinline__ void wgmma_m64n192k16_ss_f16(float (&d)[24][4], uint64_t desc_a, uint64_t desc_b, int scale_d) {
#if FLASH_MHA_SM90_ENABLED
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %98, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n192k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95}, "
      "%96, %97, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3]), "+f"(d[16][0]), "+f"(d[16][1]), "+f"(d[16][2]), "+f"(d[16][3]), "+f"(d[17][0]), "+f"(d[17][1]), "+f"(d[17][2]), "+f"(d[17][3]), "+f"(d[18][0]), "+f"(d[18][1]), "+f"(d[18][2]), "+f"(d[18][3]), "+f"(d[19][0]), "+f"(d[19][1]), "+f"(d[19][2]), "+f"(d[19][3]), "+f"(d[20][0]), "+f"(d[20][1]), "+f"(d[20][2]), "+f"(d[20][3]), "+f"(d[21][0]), "+f"(d[21][1]), "+f"(d[21][2]), "+f"(d[21][3]), "+f"(d[22][0]), "+f"(d[22][1]), "+f"(d[22][2]), "+f"(d[22][3]), "+f"(d[23][0]), "+f"(d[23][1]), "+f"(d[23][2]), "+f"(d[23][3])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
#endif
}

template <typename T, int N>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 8][4], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  static_assert(N == 64 || N == 128 || N == 176 || N == 192, "wgmma_ss: N in {64, 128, 176, 192}");
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  static_assert(kBf16 || std::is_same_v<T, __half>, "wgmma_ss: bf16 or f16");
  if constexpr (N == 64) {
    if constexpr (kBf16) wgmma_m64n64k16_ss_bf16(d, desc_a, desc_b, scale_d);
    else wgmma_m64n64k16_ss_f16(d, desc_a, desc_b, scale_d);
  } else if constexpr (N == 128) {
    if constexpr (kBf16) wgmma_m64n128k16_ss_bf16(d, desc_a, desc_b, scale_d);
    else wgmma_m64n128k16_ss_f16(d, desc_a, desc_b, scale_d);
  } else if constexpr (N == 176) {
    if constexpr (kBf16) wgmma_m64n176k16_ss_bf16(d, desc_a, desc_b, scale_d);
    else wgmma_m64n176k16_ss_f16(d, desc_a, desc_b, scale_d);
  } else {
    if constexpr (kBf16) wgmma_m64n192k16_ss_bf16(d, desc_a, desc_b, scale_d);
    else wgmma_m64n192k16_ss_f16(d, desc_a, desc_b, scale_d);
  }
}

// B is MN-major (transpose bit set): for O += P V with V stored [keys, d].
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
  static_assert(N == 64 || N == 128, "wgmma_rs: N in {64, 128}");
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  static_assert(kBf16 || std::is_same_v<T, __half>, "wgmma_rs: bf16 or f16");
  if constexpr (N == 64) {
    if constexpr (kBf16) wgmma_m64n64k16_rs_bf16(d, a, desc_b, scale_d);
    else wgmma_m64n64k16_rs_f16(d, a, desc_b, scale_d);
  } else {
    if constexpr (kBf16) wgmma_m64n128k16_rs_bf16(d, a, desc_b, scale_d);
    else wgmma_m64n128k16_rs_f16(d, a, desc_b, scale_d);
  }
}

// D[64, 64] (+)= A[64, 16] (smem, MN-major: stored [16, 64], M contiguous) * B[16, 64] (smem,
// MN-major: stored [16, 64], N contiguous); both transpose bits set.
__device__ __forceinline__ void wgmma_m64n64k16_ss_tt_bf16(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b, int scale_d) {
#if FLASH_MHA_SM90_ENABLED
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "%32, %33, p, 1, 1, 1, 1;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
#endif
}

// D[64, 64] (+)= A[64, 16] (smem, MN-major: stored [16, 64], M contiguous) * B[16, 64] (smem,
// MN-major: stored [16, 64], N contiguous); both transpose bits set.
__device__ __forceinline__ void wgmma_m64n64k16_ss_tt_f16(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b, int scale_d) {
#if FLASH_MHA_SM90_ENABLED
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "%32, %33, p, 1, 1, 1, 1;\n}\n"
      : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
#endif
}

// Both operands MN-major (transpose bits set): for dQ = dS K in the backward, with dS^T stored
// [keys, queries] (A: M = queries contiguous) and K stored [keys, d] (B: N = d contiguous).
template <typename T, int N>
__device__ __forceinline__ void wgmma_ss_tt(float (&d)[N / 8][4], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  static_assert(N == 64, "wgmma_ss_tt: N == 64");
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  static_assert(kBf16 || std::is_same_v<T, __half>, "wgmma_ss_tt: bf16 or f16");
  if constexpr (kBf16) wgmma_m64n64k16_ss_tt_bf16(d, desc_a, desc_b, scale_d);
  else wgmma_m64n64k16_ss_tt_f16(d, desc_a, desc_b, scale_d);
}

// ---------------------------------------------------------------------------------------------
// Whole-tile GEMMs issued as a run of k16 wgmmas (issue only: the caller fences, commits, waits).

// acc[64, N] (+)= A[64, K] B[N, K]^T, A and B both K-major in 128-byte-swizzled panels of 64
// columns (A panels kARows rows apart in bytes * 128, B panels kBRows). The first step overwrites
// acc (scale_d 0), the rest accumulate.
template <typename T, int N, int K, int kARows, int kBRows>
__device__ __forceinline__ void gemm_ss_kmajor(float (&acc)[N / 8][4], uint32_t a_base, uint32_t b_base) {
  // k step kk: panel kk / 4, 32-byte column group kk % 4 of the 128-byte swizzled rows.
  if constexpr (kDescriptorAdvance) {
    const uint64_t da = desc_kmajor_sw128(a_base), db = desc_kmajor_sw128(b_base);
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk)
      wgmma_ss<T, N>(acc, desc_advance(da, (kk / 4) * kARows * 128 + (kk % 4) * 32),
                     desc_advance(db, (kk / 4) * kBRows * 128 + (kk % 4) * 32), kk > 0);
  } else {
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
      const uint32_t a = a_base + (kk / 4) * kARows * 128 + (kk % 4) * 32;
      const uint32_t b = b_base + (kk / 4) * kBRows * 128 + (kk % 4) * 32;
      wgmma_ss<T, N>(acc, desc_kmajor_sw128(a), desc_kmajor_sw128(b), kk > 0);
    }
  }
}

// acc[64, N] += A[64, K] B[K, N], A in registers (K / 16 fragments), B MN-major in 128-byte-swizzled
// panels of 64 columns, kBRows rows each (panel stride kBRows * 128 bytes).
template <typename T, int N, int K, int kBRows>
__device__ __forceinline__ void gemm_rs_mnmajor(float (&acc)[N / 8][4], const uint32_t (&a)[K / 16][4],
                                                uint32_t b_base) {
  if constexpr (kDescriptorAdvance) {
    const uint64_t db = desc_mnmajor_sw128(b_base, kBRows * 128);
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) wgmma_rs<T, N>(acc, a[kk], desc_advance(db, kk * 16 * 128), 1);
  } else {
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk)
      wgmma_rs<T, N>(acc, a[kk], desc_mnmajor_sw128(b_base + kk * 16 * 128, kBRows * 128), 1);
  }
}

}  // namespace flash_mha::cuda::sm90
