// Does compute-sanitizer racecheck follow a double buffer handed over by a named barrier with a
// thread count (bar.sync 1, N) between two groups of warps? sm90_bwd.cu's dbias writer warps read
// the dS^T buffer this way. Correct by construction: writers fill buffer t & 1, everyone syncs,
// readers read it; buffer t & 1 is written again at t + 2, after the sync of t + 1, which the
// readers reach only after reading t. Exits 1 if a read sees a wrong value.
//   nvcc -arch=sm_90a -o /tmp/probe benchmarks/racecheck_probe.cu && compute-sanitizer --tool racecheck /tmp/probe
#include <cstdio>

__global__ void probe(int* bad, int iters) {
  __shared__ int buf[2][256];
  const int warp = threadIdx.x / 32;
  if (warp >= 2 && warp < 6) {  // 4 writer warps (like the consumers)
    for (int t = 0; t < iters; ++t) {
      buf[t & 1][threadIdx.x - 64] = t;
      buf[t & 1][threadIdx.x + 64] = t;
      asm volatile("bar.sync 1, 192;\n" ::: "memory");
    }
  } else if (warp < 2) {  // 2 reader warps (like warps 2, 3 of the producer warpgroup)
    int wrong = 0;
    for (int t = 0; t < iters; ++t) {
      asm volatile("bar.sync 1, 192;\n" ::: "memory");
      for (int i = threadIdx.x; i < 256; i += 64) wrong += buf[t & 1][i] != t;
    }
    if (wrong) atomicAdd(bad, wrong);
  }
}

int main() {
  int* bad;
  cudaMallocManaged(&bad, sizeof(int));
  *bad = 0;
  probe<<<4, 256>>>(bad, 64);
  const cudaError_t e = cudaDeviceSynchronize();
  printf("probe: %s, wrong reads %d\n", cudaGetErrorString(e), *bad);
  return e != cudaSuccess || *bad != 0;
}
