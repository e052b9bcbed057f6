// Does compute-sanitizer racecheck follow a double buffer handed over by a named barrier with a
// thread count (bar.sync 1, N) between two groups of warps? sm90_bwd.cu's dbias writer warps read
// the dS^T buffer this way. Correct by construction: writers fill buffer t & 1, everyone syncs,
// readers read it; buffer t & 1 is written again at t + 2, after the sync of t + 1, which the
// readers reach only after reading t. Each kernel exits with a count of wrong reads.
//   probe_first: the participants are the block's first 192 threads, the others exit at once.
//   probe_layout: sm90_bwd's layout: 12 warps, warps 0-1 busy elsewhere (not on the barrier),
//     readers warps 2-3, writers warps 4-11, bar.sync 1, 320; optionally setmaxnreg as there.
//   nvcc -gencode arch=compute_90a,code=sm_90a -o /tmp/probe benchmarks/racecheck_probe.cu && compute-sanitizer --tool racecheck /tmp/probe
#include <cstdio>

__global__ void probe_first(int* bad, int iters) {
  __shared__ int buf[2][256];
  const int warp = threadIdx.x / 32;
  if (warp >= 2 && warp < 6) {  // 4 writer warps
    for (int t = 0; t < iters; ++t) {
      buf[t & 1][threadIdx.x - 64] = t;
      buf[t & 1][threadIdx.x + 64] = t;
      asm volatile("bar.sync 1, 192;\n" ::: "memory");
    }
  } else if (warp < 2) {  // 2 reader warps
    int wrong = 0;
    for (int t = 0; t < iters; ++t) {
      asm volatile("bar.sync 1, 192;\n" ::: "memory");
      for (int i = threadIdx.x; i < 256; i += 64) wrong += buf[t & 1][i] != t;
    }
    if (wrong) atomicAdd(bad, wrong);
  }
}

template <bool kSetMaxNReg>
__global__ void __launch_bounds__(384, 1) probe_layout(int* bad, int iters) {
  __shared__ int buf[2][512];
  const int warp = threadIdx.x / 32;
  if (warp < 4) {
    if constexpr (kSetMaxNReg) asm volatile("setmaxnreg.dec.sync.aligned.u32 24;\n" ::: "memory");
    if (warp < 2) {  // busy elsewhere for a while, never on barrier 1
      const long long t0 = clock64();
      while (clock64() - t0 < 20000) {
      }
    } else {  // readers: threads 64..127
      int wrong = 0;
      for (int t = 0; t < iters; ++t) {
        __syncwarp();
        asm volatile("bar.sync 1, 320;\n" ::: "memory");
        for (int i = threadIdx.x - 64; i < 512; i += 64) wrong += buf[t & 1][i] != t;
      }
      if (wrong) atomicAdd(bad, wrong);
    }
  } else {  // writers: threads 128..383
    if constexpr (kSetMaxNReg) asm volatile("setmaxnreg.inc.sync.aligned.u32 240;\n" ::: "memory");
    for (int t = 0; t < iters; ++t) {
      buf[t & 1][threadIdx.x - 128] = t;
      buf[t & 1][threadIdx.x + 128] = t;
      asm volatile("bar.sync 1, 320;\n" ::: "memory");
    }
  }
}

int main() {
  int* bad;
  cudaMallocManaged(&bad, 3 * sizeof(int));
  bad[0] = bad[1] = bad[2] = 0;
  probe_first<<<4, 256>>>(bad, 64);
  probe_layout<false><<<4, 384>>>(bad + 1, 64);
  probe_layout<true><<<4, 384>>>(bad + 2, 64);
  const cudaError_t e = cudaDeviceSynchronize();
  printf("probe: %s, wrong reads %d / %d / %d\n", cudaGetErrorString(e), bad[0], bad[1], bad[2]);
  return e != cudaSuccess || bad[0] + bad[1] + bad[2] != 0;
}
