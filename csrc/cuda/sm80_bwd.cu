// Tensor-core backward for float16 / bfloat16 (sm_80+, mma.sync m16n8k16, fp32 accumulation) and
// float32 (mma.sync m16n8k8 on tf32, 3xTF32: Frag<float> in sm80_tile.cuh).
//
// 1. D = rowsum(dO * O) in float (one warp per row).
// 2. One block of 8 warps (4 for d = 64) per (batch, kv head, 16 keys per warp); warp w owns keys
//    16w .. 16w+15 and keeps their dK, dV in registers while it walks the query heads of the GQA
//    group and their 64-query tiles (float32: 32; Q, dO, lse, D double buffered through shared memory with
//    cp.async). The 16-bit plain kernels differ (BwdTraits): at d = 64 a warp owns 32 keys over
//    32-query tiles (kMT), at d >= 96 (the only layout above 128) the warps split S^T / dP^T and
//    dK / dV differently and pass P^T, dS^T through shared memory (kSplit). Per tile, in the
//    transposed (key-row) layout:
//      S^T = K Q^T,  P^T = exp2(S^T log2e - lse log2e),  dP^T = V dO^T,
//      dS^T = P^T o (dP^T Z - D),  dV += (P^T o Z) dO,  dK += dS^T Q,
//    then dS^T goes through shared memory and dQ += dS K (warps split into the tile's query
//    m-tiles x column groups) is added to a float32 workspace with atomics (DqTiles); in
//    deterministic mode the key blocks of a query tile take turns, in key-block order
//    (BwdWorkspace::dq_order), so the sums come out the same every run.
//    dbias is written by the one thread that owns each element, or added with atomics where
//    blocks share it (deterministic mode: the SIMT path takes those calls).
// 3. dQ (times the scale) and dbias converted from float to the input dtype.
// Head dims (multiples of 8) are padded with zeros up to a native width kDn in {32, 64, 96, 128,
// 192, 256} (plain and key-mask kernels, 16-bit) or the tile width kD in {64, 128, 256} (the general
// kernel; above 128 it takes the split layout, 16-bit only).
#include <type_traits>

#include "kernels.h"
#include "sm80_tile.cuh"
#include "softmax.cuh"

namespace flash_mha::cuda {
namespace {

// dbias elements that several blocks, iterations or threads reach (a bias broadcast over batch,
// query or key, or over heads with several kv heads) are added with float atomics instead of taking
// the SIMT backward (head-broadcast bias fwd+bwd 3 -> 73 TFLOP/s on an H200, NOTES.md). Off: the
// SIMT backward takes those shapes.
constexpr bool kAtomicSharedDbias = true;

// A dbias whose every element is produced exactly once (no broadcast at all) is stored straight
// into dbias in the input dtype: no float workspace of the bias's size (4 GiB for a full bf16 bias
// at b h n^2 = 2^30), no read-modify-write, no conversion pass (full bias fwd+bwd 45 -> 76 TFLOP/s
// on an H200 together with kAtomicSharedDbias, NOTES.md).
constexpr bool kDirectDbias = true;

// A dbias broadcast over the batch (atomic float accumulator, kAtomicSharedDbias): blocks ordered
// batch fastest ((kv head, key block, batch) instead of (batch, kv head, key block)), so the batches'
// reductions into one accumulator tile, and their reads of one bias tile, come close in time and
// meet in L2, as the sm90 backward orders its items (ItemGrid::item_band). A/B on an H200 (NOTES.md,
// GPU record 2026-11-29 02:00): the d64 head-broadcast bias backward 103 / 103 against 101 / 102
// TFLOP/s at 1k and 4k (two rounds each), the full bias unchanged (121-131). Small: the head-broadcast
// dbias's cost is its per-element float atomics, not DRAM re-reads.
constexpr bool kSm80BwdBatchFastest = true;

// A shared (atomic) dbias of a 16-bit dtype with unit key stride (a bias broadcast over the batch, the
// queries or the kv heads: dbias_shared; frag_shared_dbias_ok) added from the dQ phase's dS fragments
// (query rows, pairs of adjacent keys: one red.global.add.v2.f32 per pair on sm_90) instead of one
// red.global.add.f32 per element from the S^T layout with its 64-bit addressing. A kernel of its own
// (sm80_bwd_kernel's kFragShared: the staged general kernel, d <= 128), so that the other general
// kernels keep their registers and SASS (as a runtime branch the walk cost the full bias backward
// 1-4%: 178 instead of 108 bytes of spills at d = 128). A/B on an H200 (NOTES.md, GPU record
// 2026-11-29 06:30, two rounds): head-broadcast bias backward d64 118 / 117 against 102 / 102 TFLOP/s
// (1k, b 16), 119 / 119 against 104 / 103 (4k, b 4); d128 144 / 144 against 133 / 132, 153 / 153
// against 138 / 139; the full bias unchanged. The terms are the 16-bit
// dS the dQ product reads (float before): one more rounding per term of the sum over the broadcast
// dims. benchmarks/dbias_error.py (sums of 16 to 65,536 terms, against float64): bf16 2.2-2.4e-3
// against 1.4-1.7e-3 (rounding the exact sum once: 1.4-1.7e-3), fp16 2.8-3.2e-4 against 1.8-2.1e-4.
constexpr bool kSm80FragSharedDbias = true;

// A bias without a mask or dropout (the common training case) through the staged general kernel
// instantiated without the mask and dropout code (sm80_bwd_kernel's kBiasOnly; 16-bit, d <= 128),
// as kBwdBiasOnly does for the Hopper backward (+8-16% there, sm90_bwd_work.cuh). With it on the
// fragment-walk shared dbias kernel (kFragShared) is bias-only as well, and a shared dbias with a
// mask or dropout takes the general kernel's S^T-layout atomics; so on adds 4 kernels. On since
// e3037fb's A/B (H200, bf16, no causal, 1k/4k/16k; benchmarks/results/H200-ab-sm80-bias-only-e3037fb.txt):
// full-bias backward d64 +16-21%, d128 +9%; head-broadcast d64 +10-21%, d128 +8-16%; forward unchanged.
constexpr bool kSm80BwdBiasOnly = true;

// kChunks4 twins (bias / mask rows in 4-byte chunks, kSm80StageChunks4) of the bias-only and
// fragment-walk forms too, instead of the general form for every such row (8 kernels more). At
// n = 1004 (H200, bf16, sm80 forced; NOTES.md, GPU record 2026-11-29 17:52) the general form ran the
// backward of a full bias at d128 130 TFLOP/s, where the bias-only form with the chunk picked at
// run time had run 144; head-broadcast d64 90 against 106 (fragment walk), d128 118 against 126.
// Compiled only, not run on a GPU.
constexpr bool kSm80BwdChunks4BiasForms = false;

// Dropout without a bias, a dbias or a query-varying mask (dropout alone, or with key padding) runs
// on the plain kernels with kDropout (16-bit, d = 64 and 128: two key m-tiles per warp at d = 64, the
// split layout at 128) instead of the general kernel: the folded scale, the plain tiling. The keep
// bits are the general kernel's (dropout_bits_keyrows). Adds 8 kernels. A/B on an H200 (bf16,
// dropout 0.1, sm80 forced, 1k / 4k / 16k, two rounds; NOTES.md, 2026-11-29 15:45): backward d64
// 200 / 232 / 242 TFLOP/s against 89 / 96 / 98, d128 195 / 224 / 232 against 112 / 120 / 123 (ptxas,
// sm_90a: 24 and 112 bytes of spill); d64 with one key m-tile per warp (no spill) 190 / 221 / 230.
constexpr bool kSm80BwdDropoutPlain = true;
// With kSm80BwdDropoutPlain: the d128 dropout kernel (split layout, no key mask) draws the keep
// bits of the next iteration at the end of this one (after its dQ step, where only dK / dV are
// live), carried in one register, instead of between the S^T / dP^T products and the P^T / dS^T
// loop. ptxas (sm_90a): no spill, against 112 bytes (the other dropout kernels: no better, or
// worse). A/B on an H200 (bf16, dropout 0.1, sm80 forced, non-causal, 1k / 4k / 16k, two rounds;
// NOTES.md, 2026-11-29 17:00): d128 backward 222 / 258 / 270 TFLOP/s against 195 / 222-223 / 231-232.
constexpr bool kSm80BwdDropoutBitsAhead = true;

// kMT: key m-tiles (16 keys each) per warp. 2 (the 16-bit plain kernels at d = 64): each Q / dO
// fragment read from shared memory feeds both m-tiles, and a block covers 128 keys (half the dQ
// atomics and Q / dO loads per key), with 32-query tiles so that S^T, dP^T (32 + 32 registers) fit
// beside dK, dV (128). The general kernels (bias, mask, dropout) keep 1.
// kSplit (the 16-bit plain kernels at d >= 96 and every 16-bit kernel above 128, where 32 keys of dK,
// dV do not fit a warp; the general one above 128 pads to 256 and keeps one Q / dO stage): warp w
// takes keys 32 (w % kKeyGroups) .. + 31 and slice w / kKeyGroups of kSlices: for S^T / dP^T that
// slice of the tile's queries, for dK / dV that slice of the kDn columns (d <= 128: 4 key groups x 2
// slices, 32 queries and kDn / 2 columns; d > 128: 2 x 4, 16 queries and kDn / 4 columns, so that
// dK, dV stay at 128 registers); P^T and dS^T go through shared memory between the two (as
// FlashAttention-2 does), so every fragment read from shared memory feeds two m-tiles or n-tiles.
// kD: the shared tiles' width (64, 128, 256); kDn: the columns the S^T / dP^T reductions and dK / dV
// run over (a native head dim: 32 in tiles of 64, 96 in tiles of 128, 192 in tiles of 256), kDq
// those of dQ = dS K: kDn where the column groups split it into 16-column pairs, else kD.
// kStages: Q / dO buffers. 2: the next iteration's tiles load during this one; 1 (the split kernels
// above 128 where 209 KiB are not there, A100: 145 KiB): they load during its dQ step.
template <typename T, int kD_, int kMT_ = 1, bool kSplit_ = false, int kDn_ = kD_, int kStages_ = 2>
struct BwdTraits {
  static constexpr int kStages = kStages_;
  static_assert(kStages == 2 || (kStages == 1 && kSplit_), "one Q / dO stage: the split kernels");
  static constexpr int kD = kD_;
  static constexpr int kDn = kDn_;
  static_assert(kDn % 16 == 0 && kDn <= kD && (!kSplit_ || kDn % 32 == 0), "kDn: 16-column pairs (split: 32)");
  static constexpr int kMT = kMT_;
  static constexpr bool kSplit = kSplit_;
  static_assert(kMT == 1 || (kMT == 2 && sizeof(T) == 2 && kD == 64), "two key m-tiles per warp: 16-bit, d = 64");
  static_assert(!kSplit || (kMT == 1 && sizeof(T) == 2 && kD >= 128), "the split layout: 16-bit, d >= 96");
  static_assert(kSplit || kD <= 128, "d > 128: the split layout only (dK, dV of 16 keys would not fit)");
  // Warps x 16 kMT keys per block (kSplit: 4 x 32). d = 128: 8 warps, so every Q / dO tile read
  // from shared memory and every dQ atomic covers 128 keys (half the atomics of 64-key blocks);
  // 2-3% faster than 4 warps on an H200. d = 64: 4 warps (two blocks per SM), 4-8% faster than 8
  // (NOTES.md, run 4).
  static constexpr int kWarps = kD <= 64 ? 4 : 8;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kWarpKeys = kSplit ? 32 : 16 * kMT;  // keys of a warp's dK / dV
  static constexpr int kKeyGroups = kSplit ? (kD > 128 ? 2 : 4) : kWarps;  // warp w's keys: group w % kKeyGroups
  static constexpr int kSlices = kWarps / kKeyGroups;  // kSplit: query / column slices (slice w / kKeyGroups)
  static constexpr int kBlockN = kWarpKeys * kKeyGroups;  // keys per block
  // Queries per inner tile. float32: 32, so that the [16 keys, kBlockM] S^T and dP^T tiles and the
  // split (hi, lo) fragments fit the registers next to dK, dV; kMT = 2: 32 likewise.
  static constexpr int kBlockM = sizeof(T) == 2 ? 64 / kMT : 32;
  // dS^T's row length in elements: at least 128 bytes (the swizzle's 8 chunks; kMT = 2 leaves the
  // second half of each row unused).
  static constexpr int kDsCols = kBlockM * static_cast<int>(sizeof(T)) >= 128 ? kBlockM : 128 / static_cast<int>(sizeof(T));
  // dQ = dS K of a query tile: warp w takes kDqMT m-tiles from kDqMT (w % kQG) and column group
  // w / kQG of kDq (kSplit: 32 x 32 per warp at d = 128, 4 ldmatrix per 8 mma instead of 5; at
  // kDn = 96 one m-tile x 48 columns, so that dQ runs over 96 columns, not 128).
  static constexpr int kQMT = kBlockM / 16;
  static constexpr int kDqMT = kSplit && (kDn / 16) % 4 == 0 ? 2 : 1;
  static constexpr int kQG = kQMT / kDqMT;
  static constexpr int kColGroups = kWarps / kQG;
  static_assert(kWarps % kQG == 0 && kQMT <= 4, "dQ split: query m-tiles x column groups");
  static_assert((kD / 16) % kColGroups == 0, "column groups of whole 16-column pairs");
  static constexpr int kDq = (kDn / 16) % kColGroups == 0 ? kDn : kD;
  struct Smem {
    T k[kBlockN * kD];            // [kBlockN, kD] swizzled
    T v[kBlockN * kD];            // [kBlockN, kD] swizzled
    T q[kStages][kBlockM * kD];     // [stage][kBlockM, kD] swizzled
    T dout[kStages][kBlockM * kD];  // [stage][kBlockM, kD] swizzled
    T ds[kBlockN * kDsCols];      // dS^T [kBlockN, kBlockM] in rows of kDsCols, swizzled
    T pt[kSplit ? kBlockN * kDsCols : 8];  // kSplit: P^T (dropout-free), as dS^T
    float lse2[2][kBlockM];       // [stage][kBlockM] lse * log2(e); +inf past n_q
    float dsum[2][kBlockM];       // [stage][kBlockM] D
  };
  static constexpr int64_t kSmemBytes = sizeof(Smem);
  // The general kernel's bias / mask tiles of one iteration ([kBlockM queries, kBlockN keys], rows
  // padded by 16 bytes: conflict-free ldmatrix .trans and per-element reads), in 1 or 2 stages
  // (staged_smem_bytes): with 2, the next iteration's tiles load with its Q / dO; with 1, during
  // this iteration's dQ step. Placed after Smem: the bias stages, then the mask stages (each only
  // when present).
  static constexpr int kBiasLd = kBlockN + 16 / sizeof(T), kMaskLd = kBlockN + 16;
  static constexpr int64_t kStagedOffset = (kSmemBytes + 127) / 128 * 128;
  static constexpr int64_t kBiasBytes = (int64_t{kBlockM} * kBiasLd * sizeof(T) + 127) / 128 * 128;
  static constexpr int64_t kMaskBytes = int64_t{kBlockM} * kMaskLd;
  // float32 at d = 128: 209 KiB (sm_90); devices with less take the SIMT backward.
  static_assert(kSmemBytes <= (sizeof(T) == 2 && kD <= 128 ? 163 : 227) * 1024,
                "backward tile exceeds sm_80's 163 KiB (float32, d > 128: sm_90's 227 KiB) of shared memory per block");
  static_assert(sizeof(T) == 2 || (kD / kColGroups) % 32 == 0,
                "float32: dQ column groups start at multiples of 32 columns (PermRows32)");
};

// The float32 dQ accumulator of every kernel but the split one (which keeps [b h, n_q, d]), tiled
// as the dQ mma accumulators lie: [b h][ceil(n_q / 16)][d / 8][32 lanes][4] (lane l, element e:
// row 8 (e / 2) + l / 4 of the 16-row tile, column 2 (l % 4) + e % 2 of the 8-column one). A
// warp's adds of one accumulator tile are then one red.v4 of 512 contiguous bytes (4 lines)
// instead of two red.v2 over 8 rows each (d = 64 backward 1.00-1.06x -> 1.10-1.16x FA2, H200);
// dq_to_dtype_kernel unpermutes.
struct DqTiles {
  int64_t m_tiles, n_tiles;
  __host__ __device__ explicit DqTiles(const BwdParams& p) : m_tiles((p.n_q + 15) / 16), n_tiles(p.d / 8) {}
  // Tile (bh, m-tile mt, n-tile nt) starts at float ((bh m_tiles + mt) n_tiles + nt) 128.
  __host__ __device__ int64_t floats(int64_t bh_count) const { return bh_count * m_tiles * n_tiles * 128; }
};

// The split kernels' float32 dQ accumulator: rows [b h][n_q rounded up to kRowPad][d rounded up to
// kColPad], each 16-column group permuted so that the four columns a lane holds of an n-tile pair
// (2 t, 2 t + 1 of both: columns 2 t, 2 t + 1, 8 + 2 t, 9 + 2 t of the group, t = lane % 4) lie at
// 4 t .. 4 t + 3. A lane adds them with one red.v4, no shuffles, no row test and one column test
// per warp (dq_col0 < d) where the warps' column groups are 32 wide (the d = 128 kernels; 48 at
// kDn = 96: one test per 16 columns): the rows past n_q of the last query tile and the columns past
// d inside a warp's 32 exist and add zeros (P = 0 there; K's padding columns are 0).
// dq_rows16_to_dtype_kernel unpermutes.
struct DqRows16 {
  static constexpr int kRowPad = 64;  // a multiple of the split kernel's query tile
  static constexpr int kColPad = 32;  // of its warps' column groups: one test per warp (dq_col0 < d)
  int64_t rows, ld;
  __host__ __device__ explicit DqRows16(const BwdParams& p)
      : rows((p.n_q + kRowPad - 1) / kRowPad * kRowPad), ld((p.d + kColPad - 1) / kColPad * kColPad) {}
  __host__ __device__ int64_t floats(int64_t bh_count) const { return bh_count * rows * ld; }
};

// Deterministic mode: dq_order[bh][query tile] counts the key blocks that have added their part of
// that dQ tile; key block kb adds after it reads kb (every key block that sees a query tile comes
// before those that do not: first_row_seeing grows with the key), then counts itself. Rows of
// ceil(n_q / 16) ints, enough for every kernel's query tile. Zeroed with the workspace.
struct BwdWorkspace {
  float* dq_acc;     // DqTiles layout (the split kernels: DqRows16)
  float* dsum;       // [b, h, n_q]  D = rowsum(dO * O)
  float* dbias_acc;  // dbias's shape, or nullptr
  bool dbias_shared;  // dbias_shared(p): add with atomics
  bool dbias_direct;  // kDirectDbias and dbias_once(p): store into p.dbias, dbias_acc == nullptr
  int score_stages = 0;  // the general kernel's staged bias / mask tiles (staged_plan)
  int64_t bytes;
  int64_t dbias_elems;
  int* dq_order;  // deterministic mode: [b h][order_ld], else nullptr
  int64_t order_ld;
  BwdWorkspace(const BwdParams& p, void* base) {
    dbias_direct = kDirectDbias && dbias_once(p);
    dbias_elems = dbias_direct ? 0 : cuda::dbias_elems(p);
    const int64_t dq_bytes =
        align_up(std::max(DqTiles(p).floats(p.b * p.h), DqRows16(p).floats(p.b * p.h)) * 4, 256);
    const int64_t d_bytes = align_up(p.b * p.h * p.n_q * 4, 256);
    char* c = static_cast<char*>(base);
    dq_acc = reinterpret_cast<float*>(c);
    dsum = reinterpret_cast<float*>(c + dq_bytes);
    dbias_acc = p.dbias && !dbias_direct ? reinterpret_cast<float*>(c + dq_bytes + d_bytes) : nullptr;
    dbias_shared = flash_mha::cuda::dbias_shared(p);
    bytes = dq_bytes + d_bytes + align_up(dbias_elems * 4, 256);
    order_ld = (p.n_q + 15) / 16;
    dq_order = p.deterministic ? reinterpret_cast<int*>(c + bytes) : nullptr;
    if (p.deterministic) bytes += align_up(p.b * p.h * order_ld * 4, 256);
  }
};

// dQ = scale * the DqTiles accumulator, in T ([b, h, n_q, d] contiguous): thread x reads lane
// x % 32's 4 floats of tile x / 32 and writes its 2 x 2 elements.
template <typename T>
__global__ void dq_to_dtype_kernel(T* dq, const float* acc, DqTiles tiles, int64_t n_q, int64_t d, int64_t n,
                                   float scale) {
  for (int64_t x = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; x < n;
       x += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int lane = static_cast<int>(x % 32);
    const int64_t t = x / 32, nt = t % tiles.n_tiles, mt = (t / tiles.n_tiles) % tiles.m_tiles;
    const int64_t bh = t / (tiles.n_tiles * tiles.m_tiles);
    const float4 v = reinterpret_cast<const float4*>(acc)[x];
    const int64_t i = 16 * mt + lane / 4, c = 8 * nt + 2 * (lane % 4);
    T* row = dq + (bh * n_q + i) * d + c;
    if (i < n_q) store2(row, v.x * scale, v.y * scale);
    if (i + 8 < n_q) store2(row + 8 * d, v.z * scale, v.w * scale);
  }
}

// dQ = scale * the DqRows16 accumulator, in T ([b, h, n_q, d] contiguous): thread x takes float4
// x, columns 16 g + 2 t, + 1 and 16 g + 8 + 2 t, + 1 of its row (g, t: the float4's group and lane).
template <typename T>
__global__ void dq_rows16_to_dtype_kernel(T* dq, const float* acc, DqRows16 lay, int64_t n_q, int64_t d, int64_t n,
                                          float scale) {
  const int64_t per_row = lay.ld / 4;
  for (int64_t x = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; x < n;
       x += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t q4 = x % per_row, r = x / per_row, i = r % lay.rows, bh = r / lay.rows;
    if (i >= n_q) continue;
    const float4 v = reinterpret_cast<const float4*>(acc)[x];
    const int64_t c = 16 * (q4 / 4) + 2 * (q4 % 4);
    T* row = dq + (bh * n_q + i) * d + c;
    if (c < d) store2(row, v.x * scale, v.y * scale);
    if (c + 8 < d) store2(row + 8, v.z * scale, v.w * scale);
  }
}

template <typename T>
__global__ void __launch_bounds__(128) dot_do_o_kernel(const BwdParams p, float* dsum) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x / 32;
  if (row >= p.b * p.h * p.n_q) return;
  const int lane = threadIdx.x % 32;
  const int64_t i = row % p.n_q, bh = row / p.n_q, hi = bh % p.h, bi = bh / p.h;
  const T* o = static_cast<const T*>(p.o) + bi * p.o_sb + hi * p.o_sh + i * p.o_sn;
  const T* dout = static_cast<const T*>(p.dout) + bi * p.do_sb + hi * p.do_sh + i * p.do_sn;
  float acc = 0.f;
  for (int64_t c = lane; c < p.d_v; c += 32) acc += to_acc<float>(o[c]) * to_acc<float>(dout[c]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) dsum[row] = acc;
}

// kSm80FragSharedDbias's kernel takes the call (with a staged plan): a shared dbias of a 16-bit
// dtype, d <= 128, with unit key stride and the float accumulator's key pairs 8-byte aligned. The
// overload without arguments says whether the kernel exists (the instantiation is compiled).
template <typename T, int kD>
constexpr bool frag_shared_dbias_ok() {
  return kSm80FragSharedDbias && kAtomicSharedDbias && sizeof(T) == 2 && kD <= 128;
}
template <typename T, int kD>
bool frag_shared_dbias_ok(const BwdParams& p, const BwdWorkspace& ws) {
  return frag_shared_dbias_ok<T, kD>() && ws.dbias_acc && ws.dbias_shared && p.dbias_s.k == 1 &&
         ((p.dbias_s.q | p.dbias_s.h | p.dbias_s.b) & 1) == 0 && (reinterpret_cast<uintptr_t>(ws.dbias_acc) & 7) == 0;
}

// Whether the general kernel can stage the bias and mask (those present) in shared memory, in how
// many stages, and how much shared memory it then needs (bytes 0: it cannot). 16-byte chunks of a
// row must be whole and aligned: unit key stride; batch / head / query strides, n_k and the base in
// multiples of 16 bytes, or of 4 for the kChunks4 kernel (staged_chunk_bytes). Two stages where
// they keep the blocks per SM the registers allow (H100 / H200: every case), else one, else none
// (A100, 16-bit: d = 64 bias + mask one stage, bias or mask alone two; d = 128 bias alone one
// stage, mask alone two, both none).
struct StagedPlan {
  int64_t bytes = 0;
  int stages = 0;
};
template <typename T, typename Tr>
StagedPlan staged_plan(const BwdParams& p) {
  if (!p.bias && !p.mask) return {};
  if (staged_chunk_bytes<T>(p) == 0) return {};
  const int64_t per_block = max_smem_per_block(), per_sm = max_smem_per_sm();
  const int64_t reg_blocks = 65536 / (Tr::kThreads * 256);  // blocks per SM at up to 255 registers
  auto blocks = [&](int64_t bytes) { return per_sm / (bytes + 1024); };
  const int64_t target = std::min<int64_t>(reg_blocks, blocks(Tr::kSmemBytes));
  for (int stages = 2; stages >= 1; --stages) {
    const int64_t bytes =
        Tr::kStagedOffset + stages * ((p.bias ? Tr::kBiasBytes : 0) + (p.mask ? Tr::kMaskBytes : 0));
    if (bytes <= per_block && (stages == 1 || blocks(bytes) >= target)) return {bytes, stages};
  }
  return {};
}

// kGeneral: bias, mask, dropout or dbias present; otherwise the score epilogue is a multiply plus,
// on bound / diagonal tiles only, an integer visibility test. kStaged: the bias / mask tiles come
// through shared memory (staged_plan), else element by element from global memory.
// kKeyMask (with !kGeneral): the plain kernel plus a key mask (constant along the queries, no bias,
// no dropout: key padding), two bytes per thread and head.
// kOrdered (deterministic mode; the general kernel, unstaged, takes every call there): key block kb
// adds its dQ part of a query tile after key blocks 0 .. kb - 1 (BwdWorkspace::dq_order). A template
// flag: tested at run time in every kernel, it cost the plain backward 3% (H200).
// kFragShared (the staged general kernel, 16-bit; kSm80FragSharedDbias): a shared dbias added from
// the dQ phase's dS fragments; the launch has checked frag_shared_dbias_ok.
// kBiasOnly (the staged general kernel; kSm80BwdBiasOnly): a bias, no mask, no dropout.
// kDropout (with !kGeneral; kSm80BwdDropoutPlain): the plain kernel (or with kKeyMask) plus dropout.
// kChunks4 (the staged general kernel; its kFragShared / kBiasOnly forms only with
// kSm80BwdChunks4BiasForms; kSm80StageChunks4): the bias / mask tiles by 4-byte cp.async chunks,
// for rows that are not 16-byte aligned.
template <typename T, typename Tr, bool kGeneral, bool kStaged, bool kKeyMask = false, bool kOrdered = false,
          bool kFragShared = false, bool kBiasOnly = false, bool kDropout = false, bool kChunks4 = false>
__global__ void __launch_bounds__(Tr::kThreads) sm80_bwd_kernel(const BwdParams p, BwdWorkspace ws) {
  static_assert(!kDropout || !kGeneral, "kDropout: the plain kernels (the general one draws at run time)");
  constexpr int kD = Tr::kD, kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kThreads = Tr::kThreads;
  constexpr int kWarpKeys = Tr::kWarpKeys, kDsCols = Tr::kDsCols, kDqMT = Tr::kDqMT;
  constexpr int kKT = kWarpKeys / 16;  // key m-tiles of a warp
  constexpr bool kSplit = Tr::kSplit;
  // The general kernels: one key m-tile per warp, or the split layout's two (d > 128).
  static_assert(kKT == 1 || kSplit || !kGeneral, "the general kernels: kMT = 1");
  constexpr int kSlices = Tr::kSlices;
  constexpr int kNS = (kSplit ? kBlockM / kSlices : kBlockM) / 8;  // n-tiles of an m-tile's S^T (queries)
  constexpr int kDn = Tr::kDn, kDq = Tr::kDq;
  constexpr int kNO = (kSplit ? kDn / kSlices : kDn) / 8;  // n-tiles of an m-tile's dK / dV (columns)
  static_assert(kNS % 2 == 0 && kNO % 2 == 0, "n-tile pairs");
  constexpr int kNQ = kDq / 8 / Tr::kColGroups;      // n-tiles of a warp's [16 queries, kDq / groups] dQ m-tiles
  extern __shared__ __align__(128) unsigned char smem_raw[];
  auto& sm = *reinterpret_cast<typename Tr::Smem*>(smem_raw);

  const int64_t n_kb = (p.n_k + kBlockN - 1) / kBlockN;
  int64_t blk = blockIdx.x, kb, kvh, bi;
  // kOrdered (deterministic mode) keeps the key block fastest: a shared dbias never reaches it.
  if (kSm80BwdBatchFastest && kGeneral && !kOrdered && p.dbias && p.dbias_s.b == 0 && p.b > 1) {
    bi = blk % p.b;
    blk /= p.b;
    kb = blk % n_kb;
    kvh = blk / n_kb;
  } else {
    kb = blk % n_kb;
    blk /= n_kb;
    kvh = blk % p.h_kv;
    bi = blk / p.h_kv;
  }
  const int64_t group = p.h / p.h_kv;
  const int64_t j0 = kb * kBlockN;
  const int cols = static_cast<int>(imin(kBlockN, p.n_k - j0));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int d = static_cast<int>(p.d), dv = static_cast<int>(p.d_v);
  const int64_t shift = causal_shift(p);

  // Query tiles of each head that can see this key tile (causal: from the diagonal on).
  // (None when first_row == n_q: a partial last query tile would otherwise cost a masked iteration.)
  const int64_t first_row = first_row_seeing(p, j0), first_qt = first_row / kBlockM;
  const int64_t n_qt = first_row < p.n_q ? (p.n_q + kBlockM - 1) / kBlockM - first_qt : 0;
  const int64_t n_iters = group * (n_qt > 0 ? n_qt : 0);

  // kKeyMask: a block whose keys no query head of its group sees (padding) only writes zero dK, dV.
  if constexpr (kKeyMask) {
    bool any = false;
    const int64_t heads = p.mask_s.h == 0 ? 1 : group;
    for (int64_t g = 0; g < heads && !any; ++g) {
      const uint8_t* mk = p.mask + bi * p.mask_s.b + (kvh * group + g) * p.mask_s.h;
      for (int c = threadIdx.x; c < cols && !any; c += kThreads) any = mk[(j0 + c) * p.mask_s.k] != 0;
    }
    if (!__syncthreads_or(any)) {
      T* const dkg = static_cast<T*>(p.dk) + ((bi * p.h_kv + kvh) * p.n_k + j0) * p.d;
      T* const dvg = static_cast<T*>(p.dv) + ((bi * p.h_kv + kvh) * p.n_k + j0) * p.d_v;
      for (int64_t e = threadIdx.x; e < cols * p.d; e += kThreads) dkg[e] = from_acc<T>(0.f);
      for (int64_t e = threadIdx.x; e < cols * p.d_v; e += kThreads) dvg[e] = from_acc<T>(0.f);
      return;
    }
  }

  const T* kg = static_cast<const T*>(p.k) + bi * p.k_sb + kvh * p.k_sh + j0 * p.k_sn;  // [cols, d]
  const T* vg = static_cast<const T*>(p.v) + bi * p.v_sb + kvh * p.v_sh + j0 * p.v_sn;  // [cols, d_v]
  load_tile_async<kBlockN, kD, kThreads>(sm.k, kg, p.k_sn, cols, d);
  load_tile_async<kBlockN, kD, kThreads>(sm.v, vg, p.v_sn, cols, dv);

  // Iteration n (head hi, query tile from row i0): prefetch starts the loads of its Q / dO tiles into
  // stage n & 1 and those of its lse / D rows into registers (thread x < kBlockM: row i0 + x), which
  // store_rows puts into that stage at the end of the iteration before, so that their latency is
  // not waited for at the loads.
  TileStream<kBlockM, kD, kThreads, T> q_stream(static_cast<const T*>(p.q), p.q_sn, d),
      do_stream(static_cast<const T*>(p.dout), p.do_sn, dv);
  static_assert(kBlockM <= kThreads, "one lse / D row per thread");
  float lse_next = 0.f, dsum_next = 0.f;
  auto prefetch = [&](int64_t n, int64_t hi, int64_t i0) {
    const int st = Tr::kStages == 2 ? static_cast<int>(n & 1) : 0;
    const int rows = static_cast<int>(imin(kBlockM, p.n_q - i0));
    q_stream.load_rows(sm.q[st], static_cast<const T*>(p.q) + bi * p.q_sb + hi * p.q_sh + i0 * p.q_sn, rows);
    do_stream.load_rows(sm.dout[st], static_cast<const T*>(p.dout) + bi * p.do_sb + hi * p.do_sh + i0 * p.do_sn, rows);
    const int x = threadIdx.x;
    const int64_t row = (bi * p.h + hi) * p.n_q + i0 + x;
    lse_next = __int_as_float(0x7f800000);  // rows past n_q: P = 2^-inf = 0
    dsum_next = 0.f;
    if (x < rows) {
      lse_next = static_cast<const float*>(p.lse)[row];
      dsum_next = ws.dsum[row];
    }
  };
  auto store_rows = [&](int64_t n) {
    if (threadIdx.x < kBlockM) {
      sm.lse2[n & 1][threadIdx.x] = lse_next * kLog2e;
      sm.dsum[n & 1][threadIdx.x] = dsum_next;
    }
  };
  // The bias / mask tiles of iteration n (kStaged): queries past n_q and keys past n_k read as 0.
  // Stage buf: bias_st(buf), mask_st(buf); iteration n uses buf (n & 1) with two stages, else 0.
  const int stages = ws.score_stages;
  auto bias_st = [&](int buf) { return reinterpret_cast<T*>(smem_raw + Tr::kStagedOffset + buf * Tr::kBiasBytes); };
  auto mask_st = [&](int buf) {
    return smem_raw + Tr::kStagedOffset + (p.bias ? stages * Tr::kBiasBytes : 0) + buf * Tr::kMaskBytes;
  };
  const int bias_ld = p.bias_s.q == 0 ? 0 : Tr::kBiasLd, mask_ld = p.mask_s.q == 0 ? 0 : Tr::kMaskLd;
  auto load_scores = [&](int64_t n, int64_t hi, int64_t i0) {
    if constexpr (kStaged) {
      const int buf = stages == 2 ? static_cast<int>(n & 1) : 0;
      const int rows = static_cast<int>(imin(kBlockM, p.n_q - i0));
      if (p.bias)
        load_score_tile<T, kBlockM, kBlockN, Tr::kBiasLd, kThreads, kChunks4 ? 4 : 16>(
            bias_st(buf), static_cast<const T*>(p.bias) + bi * p.bias_s.b + hi * p.bias_s.h + i0 * p.bias_s.q + j0,
            p.bias_s.q, rows, cols);
      if (!kBiasOnly && p.mask)
        load_score_tile<uint8_t, kBlockM, kBlockN, Tr::kMaskLd, kThreads, kChunks4 ? 4 : 16>(
            mask_st(buf), p.mask + bi * p.mask_s.b + hi * p.mask_s.h + i0 * p.mask_s.q + j0, p.mask_s.q, rows, cols);
    }
  };
  if (n_iters > 0) {
    prefetch(0, kvh * group, first_qt * kBlockM);
    load_scores(0, kvh * group, first_qt * kBlockM);
    store_rows(0);
  }
  cp_async_commit_group();

  Dropout drop;
  drop.init(p);
  float dk[kKT][kNO][4], dvacc[kKT][kNO][4];  // m-tile mt: this warp's keys 16 mt .. 16 mt + 15, [16, kDn]
  auto zero_dkdv = [&] {
#pragma unroll
    for (int mt = 0; mt < kKT; ++mt) {
      zero_acc(dk[mt]);
      zero_acc(dvacc[mt]);
    }
  };
  zero_dkdv();
  const int key_grp = kSplit ? warp % Tr::kKeyGroups : warp;
  const int64_t key0 = j0 + kWarpKeys * key_grp;  // first key of this warp
  // kSplit: the warp's first query of S^T / dP^T and first column of dK / dV.
  const int slice = warp / Tr::kKeyGroups;
  const int q_off = kSplit ? kBlockM / kSlices * slice : 0, col_off = kSplit ? kDn / kSlices * slice : 0;
  // dK = scale * dS^T Q and dV (rows key0 + 16 mt + lane / 4 (+ 8)) written from the accumulators. float32
  // also writes them every kFlushK queries (sm80_tile.cuh) and zeroes the accumulators: the first
  // time stored, later added by red.add, as is the last part; no other thread writes these rows.
  bool parted = false;  // block-uniform: dK / dV hold partial sums (float32)
  auto write_dkdv = [&] {
    const float scale = static_cast<float>(p.scale);
#pragma unroll
    for (int hm = 0; hm < 2 * kKT; ++hm) {
      const int mt = hm / 2, h = hm % 2;
      const int64_t j = key0 + 16 * mt + frag_row(lane, 2 * h);
      if (j >= p.n_k) continue;
      T* dkg = static_cast<T*>(p.dk) + ((bi * p.h_kv + kvh) * p.n_k + j) * p.d;
      T* dvg = static_cast<T*>(p.dv) + ((bi * p.h_kv + kvh) * p.n_k + j) * p.d_v;
      auto put = [&](T* dst, float x, float y) {
        if constexpr (sizeof(T) == 4) {
          if (parted) {
            red_add_v2_f32(reinterpret_cast<float*>(dst), x, y);
            return;
          }
        }
        store2(dst, x, y);
      };
#pragma unroll
      for (int nt = 0; nt < kNO; ++nt) {
        const int c = col_off + frag_col(lane, nt, 0);
        if (c < d) put(dkg + c, dk[mt][nt][2 * h] * scale, dk[mt][nt][2 * h + 1] * scale);
        if (c < dv) put(dvg + c, dvacc[mt][nt][2 * h], dvacc[mt][nt][2 * h + 1]);
      }
    }
  };
  constexpr int kDc = kCols16<T, kD>;  // the tiles' width for the ldmatrix address patterns
  constexpr bool kF32 = sizeof(T) == 4;
  const auto k_addr = ldsm_a_addr<kDc>(sm.k + kWarpKeys * key_grp * kD);   // K as A of S^T = K Q^T
  const auto v_addr = ldsm_a_addr<kDc>(sm.v + kWarpKeys * key_grp * kD);   // V as A of dP^T = V dO^T
  // dQ phase: this warp's query m-tiles dq_mt .. dq_mt + kDqMT - 1 and column group (columns from dq_col0).
  const int dq_mt = kDqMT * (warp % Tr::kQG), dq_col0 = (warp / Tr::kQG) * (kDq / Tr::kColGroups);
  const auto kt_addr = [&] {  // K as B of dQ = dS K
    if constexpr (kF32) return TransB<T, kD>(sm.k, dq_col0);
    else return TransB<T, kD>(sm.k).shifted(dq_col0 / 16);
  }();
  // dS (queries 16 dq_mt ..) as A of dQ = dS K, from the transposed tile dS^T: chunk pair dq_mt
  // (float: its columns 16 dq_mt + 8 h + lane / 4, read in acc_to_frag's key order).
  static_assert(kBlockM / 16 <= 4, "dS^T rows hold at most 4 chunk pairs: c / 4 == 0");
  const auto ds_addr = ldsm_a_trans_addr<kCols16<T, kDsCols>>(sm.ds);
  auto ds_pick = [&](int c) {
    return c == 0 ? ds_addr.base[0] : c == 1 ? ds_addr.base[1] : c == 2 ? ds_addr.base[2] : ds_addr.base[3];
  };
  uint32_t ds_bases[kDqMT];
#pragma unroll
  for (int m = 0; m < kDqMT; ++m) ds_bases[m] = ds_pick(dq_mt + m);
  static_assert(sizeof(T) == 2 || kDsCols == kBlockM, "float32: dS^T rows of kBlockM");
  const PermRows32<kBlockM, 2> ds_f32(reinterpret_cast<const float*>(sm.ds), 16 * dq_mt);

  // Staged 16-bit bias as S^T fragments by ldmatrix .trans: lane l gives query row
  // 8 (l / 16) + l % 8 (+ 16 c for call c) at keys 16 warp + 8 ((l / 8) % 2); call c returns the
  // pairs of n-tile 2 c (rows g, g + 8) and 2 c + 1 (rows g, g + 8). A query-broadcast bias
  // (bias_ld 0) gives every row the same address, which transposes to the same values.
  // (kSplit: the warp's queries start at q_off, its keys at kWarpKeys key_grp; m-tile mt adds 16 keys.)
  const uint32_t bias_frag_addr0 = smem_addr(bias_st(0) + (q_off + 8 * (lane / 16) + lane % 8) * bias_ld +
                                             kWarpKeys * key_grp + 8 * ((lane / 8) % 2));
  // This thread's S^T elements in a staged tile: keys kWarpKeys key_grp + lane / 4 (+ 8, + 16 mt),
  // queries q_off + 2 (lane % 4) (+ 8 nt, + 1).
  const int key_l = kWarpKeys * key_grp + lane / 4, q_l = q_off + 2 * (lane % 4);
  // dbias written from the dQ phase's dS fragments (16-bit, every element produced once, unit key
  // stride): query rows, pairs of adjacent keys, instead of element by element from the S^T layout.
  const bool frag_dbias =
      kGeneral && !kFragShared && sizeof(T) == 2 && kDirectDbias && ws.dbias_direct && p.dbias_s.k == 1;
  const bool dbias_pairs = ((p.dbias_s.q | p.dbias_s.h | p.dbias_s.b) & 1) == 0 &&
                           (reinterpret_cast<uintptr_t>(p.dbias) & 3) == 0;
  static_assert(!kFragShared || (kGeneral && kStaged && !kOrdered && sizeof(T) == 2 && kAtomicSharedDbias),
                "the fragment-walk shared dbias: the staged general 16-bit kernel");
  static_assert(!kBiasOnly || (kGeneral && kStaged && !kOrdered), "bias-only: the staged general kernel");
  static_assert(!kChunks4 || (kGeneral && kStaged && !kOrdered &&
                              (kSm80BwdChunks4BiasForms || (!kFragShared && !kBiasOnly))),
                "kChunks4: the staged general kernel (and its bias-only / fragment-walk forms with "
                "kSm80BwdChunks4BiasForms)");

  // kKeyMask: the score limit of the thread's key rows key0 + 16 mt + lane / 4 (+ 8) under the
  // current head's mask, +inf (visible) or -inf: min(s, limit) also hides a NaN score of a masked key.
  float row_lim[kKT][2] = {};
  bool keys_live = true;  // some key of the warp is visible (kKeyMask)
  auto load_key_mask = [&](int64_t hi) {
    const uint8_t* mk = p.mask + bi * p.mask_s.b + hi * p.mask_s.h;
    uint32_t any = 0;
#pragma unroll
    for (int hm = 0; hm < 2 * kKT; ++hm) {
      const int64_t j = key0 + lane / 4 + 8 * hm;
      const uint32_t m = j < p.n_k ? mk[j * p.mask_s.k] : 0u;
      any |= m;
      row_lim[hm / 2][hm % 2] = m ? __int_as_float(0x7f800000) : -__int_as_float(0x7f800000);
    }
    keys_live = __any_sync(0xffffffffu, any != 0);
  };

  // dV += P^T dO and dK += dS^T Q for reduction step kk (16 queries; float32: 8): A operands a_p,
  // a_ds per key m-tile, dO / Q as B (dot, qt) over the warp's dK / dV columns.
  auto dkdv_step = [&](const Frag<T> (&a_p)[kKT], const Frag<T> (&a_ds)[kKT], const TransB<T, kD>& dot,
                       const TransB<T, kD>& qt, int kk) {
#pragma unroll
    for (int np = 0; np < kNO / 2; ++np) {
      Frag<T> b;
      dot.load(b, kk, np);
      mma_tiles(dvacc, a_p, b, np);
      qt.load(b, kk, np);
      mma_tiles(dk, a_ds, b, np);
    }
  };
  const bool causal = p.causal != Causal::kNone;
  // Iteration n's head kvh * group + g_n and query tile first_qt + qt_n, carried (no division).
  int64_t g_n = 0, qt_n = 0;
  // Dropout keep bits of the warp's S^T tile of head (batch row) bh_, queries i0_ + q_off..: bit
  // 4 (kNS mt + nt) + e keeps element e of n-tile nt of key m-tile mt.
  auto draw_keep = [&](uint64_t bh_, int64_t i0_) {
    static_assert(kKT * kNS <= 8, "4 keep bits per n-tile in one word");
    uint32_t keep = 0;
#pragma unroll
    for (int mt = 0; mt < kKT; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNS; nt += 2)  // 8 bits: n-tiles nt, nt + 1
        keep |= dropout_bits_keyrows(drop, bh_, key0 + 16 * mt, i0_ + q_off, nt) << (4 * (kNS * mt + nt));
    return keep;
  };
  constexpr bool kBitsAhead = kDropout && kSm80BwdDropoutBitsAhead && kSplit && !kKeyMask;
  [[maybe_unused]] uint32_t keep_next = 0;  // kBitsAhead: the next iteration's keep bits
  if constexpr (kBitsAhead) {
    if (n_iters > 0) keep_next = draw_keep(static_cast<uint64_t>(bi * p.h + kvh * group), first_qt * kBlockM);
  }
  // One iteration; kCheck (the type of check_type) compiles the bounds / diagonal test in.
  auto step = [&](const int64_t n, auto check_type) {
    constexpr bool kCheck = decltype(check_type)::value;
    const int st = static_cast<int>(n & 1);      // lse / D stage
    const int qst = Tr::kStages == 2 ? st : 0;  // Q / dO stage
    const int64_t hi = kvh * group + g_n, i0 = (first_qt + qt_n) * kBlockM;
    const bool next_head = qt_n + 1 == n_qt;
    const int64_t hi_next = next_head ? hi + 1 : hi, i0_next = next_head ? first_qt * kBlockM : i0 + kBlockM;
    if (Tr::kStages == 2 && n + 1 < n_iters) {
      prefetch(n + 1, hi_next, i0_next);
      if (stages == 2) load_scores(n + 1, hi_next, i0_next);
      cp_async_commit_group();
      cp_async_wait_group<1>();
    } else {
      cp_async_wait_group<0>();
    }
    __syncthreads();
    const uint64_t bh = static_cast<uint64_t>(bi * p.h + hi);
    const int buf = stages == 2 ? st : 0;  // this iteration's staged bias / mask
    const T* const bias_t = bias_st(buf);
    const uint8_t* const mask_t = mask_st(buf);

    // A warp whose 16 keys no query of the tile sees through the staged mask (key padding,
    // block-sparse masks) skips its S^T, dP^T, dK and dV work: its dS^T is zero.
    bool live = true;
    if constexpr (kKeyMask) {
      if (qt_n == 0 && (n == 0 || p.mask_s.h != 0)) load_key_mask(hi);  // a new head's mask
      live = keys_live;
    }
    if constexpr (kStaged) {
      if (!kBiasOnly && p.mask) {
        uint32_t any = 0;
        // Every query row of the tile (kSplit: the dK / dV step reads the P^T, dS^T rows of the
        // warp's keys over all of them, so the warps of a key group must agree).
        for (int r = lane; r < (mask_ld == 0 ? 1 : kBlockM); r += 32) {
#pragma unroll
          for (int mt = 0; mt < kKT; ++mt) {
            const uint4 v = *reinterpret_cast<const uint4*>(mask_t + r * mask_ld + kWarpKeys * key_grp + 16 * mt);
            any |= v.x | v.y | v.z | v.w;
          }
        }
        live = __any_sync(0xffffffffu, any != 0);
      }
    }

    // S^T = K Q^T and dP^T = V dO^T: [16 keys, kBlockM queries] per m-tile
    float s[kKT][kNS][4], dp[kKT][kNS][4];
#pragma unroll
    for (int mt = 0; mt < kKT; ++mt) {
      zero_acc(s[mt]);
      zero_acc(dp[mt]);
    }
    if (live) {
      const auto q_addr = ldsm_b_addr<kDc>(sm.q[qst] + q_off * kD);        // Q as B of S^T = K Q^T
      const auto do_addr = ldsm_b_addr<kDc>(sm.dout[qst] + q_off * kD);    // dO as B of dP^T = V dO^T
      const TransB<T, kD> qt_addr(sm.q[qst]);                 // Q as B of dK += dS^T Q
      const TransB<T, kD> dot_addr(sm.dout[qst]);             // dO as B of dV += P^T dO
#pragma unroll
      for (int kk = 0; kk < kDn / kMmaK<T>; ++kk) {
        mma_step<T>(s, k_addr, q_addr, kk);
        mma_step<T>(dp, v_addr, do_addr, kk);
      }

      const ScoreCtx ctx(p, bi, hi);
      const bool diagonal = causal && key0 + kWarpKeys - 1 > i0 + shift;
      [[maybe_unused]] const bool check = kCheck && (diagonal || key0 + kWarpKeys > p.n_k || i0 + kBlockM > p.n_q);
      const int key_limit = clamp_int(p.n_k - key0), q_limit = clamp_int(p.n_q - i0 - q_off);
      const int diag = causal ? clamp_int(i0 + q_off + shift - key0) : (1 << 30);
      if constexpr (kStaged) {
#pragma unroll
        for (int mt = 0; mt < kKT; ++mt) {
          // 16-bit: one ldmatrix per pair of n-tiles, issued where the epilogue reaches it (the
          // mma and ldmatrix asm keep their order), so 4 registers of bias are live at a time.
          [[maybe_unused]] uint32_t bias4[4];  // (16-bit only)
          auto bias = [&](int nt, int h) -> float2 {
            if constexpr (sizeof(T) == 2) {
              if (nt % 2 == 0 && h == 0)
                ldmatrix_x4_trans(bias4,
                                  bias_frag_addr0 + buf * Tr::kBiasBytes + (nt / 2) * 16 * bias_ld * 2 + 32 * mt);
              return unpack2<T>(bias4[2 * (nt % 2) + h]);
            } else {
              const T* b = bias_t + (q_l + 8 * nt) * bias_ld + key_l + 16 * mt + 8 * h;
              return make_float2(b[0], b[bias_ld]);
            }
          };
          // Keep bits of row half h: bit 2 nt + x for query 8 nt + x of the thread's pair. A
          // query-broadcast mask (mask_ld 0) takes one byte per key.
          uint32_t keep_bits[2] = {0u, 0u};
          if (!kBiasOnly && p.mask) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const uint8_t* m = mask_t + q_l * mask_ld + key_l + 16 * mt + 8 * h;
              if (mask_ld == 0) {
                keep_bits[h] = m[0] != 0 ? 0xffffffffu : 0u;
              } else {
#pragma unroll
                for (int nt = 0; nt < kNS; ++nt)
                  keep_bits[h] |= ((m[8 * nt * mask_ld] != 0 ? 1u : 0u) | (m[(8 * nt + 1) * mask_ld] != 0 ? 2u : 0u))
                                  << (2 * nt);
              }
            }
          }
          auto keep = [&](int nt, int h) -> uint32_t { return (keep_bits[h] >> (2 * nt)) & 3u; };
          biased_tile_rt<kNS, true>(s[mt], ctx.scale_log2, kBiasOnly || p.bias != nullptr, bias,
                                    !kBiasOnly && p.mask != nullptr, keep, check, key_limit - 16 * mt, q_limit,
                                    diag - 16 * mt);
        }
      } else if constexpr (kGeneral) {
#pragma unroll
        for (int mt = 0; mt < kKT; ++mt)
          score_tile_log2<T, kNS, true>(ctx, s[mt], key0 + 16 * mt, i0 + q_off, diagonal);
      } else {  // raw scores: the scale is applied in P's exponent below
#pragma unroll
        for (int mt = 0; mt < kKT; ++mt) {
          scale_mask_tile<kNS, true, false>(s[mt], ctx.scale_log2, check, key_limit - 16 * mt, q_limit,
                                            diag - 16 * mt);
          if constexpr (kKeyMask) {
#pragma unroll
            for (int nt = 0; nt < kNS; ++nt)
#pragma unroll
              for (int e = 0; e < 4; ++e) s[mt][nt][e] = fminf(s[mt][nt][e], row_lim[mt][e / 2]);
          }
        }
      }
      // P^T, then dS^T = P^T (dP^T Z - D) into dp and P^T Z into s.
      // Dropout keep bits first (bit 4 nt + e: element e of n-tile nt is kept), so that the loop
      // below has no branch to split it.
      uint32_t keep_all = 0xffffffffu;
      if constexpr (kBitsAhead) {
        keep_all = keep_next;
      } else if constexpr (kGeneral || kDropout) {
        if (kDropout || (!kBiasOnly && drop.on)) keep_all = draw_keep(bh, i0);
      }
#pragma unroll
      for (int mt = 0; mt < kKT; ++mt)
#pragma unroll
        for (int nt = 0; nt < kNS; ++nt) {
          const uint32_t keep = (keep_all >> (4 * (kNS * mt + nt))) & 0xFu;
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int q = q_off + frag_col(lane, nt, e);
            // -inf or lse = +inf -> 0. The plain kernels fold the scale in (scale > 0, see launch).
            const float P = kGeneral ? ex2_approx(s[mt][nt][e] - sm.lse2[st][q])
                                     : ex2_approx(fmaf(s[mt][nt][e], ctx.scale_log2, -sm.lse2[st][q]));
            const float z = (!kGeneral && !kDropout) || kBiasOnly ? 1.f : (keep >> e) & 1 ? drop.keep_scale : 0.f;
            dp[mt][nt][e] = P * (dp[mt][nt][e] * z - sm.dsum[st][q]);
            s[mt][nt][e] = P * z;
          }
        }
      // dV += (P^T Z) dO ;  dK += dS^T Q   (k = queries); kSplit: after the barrier below.
#pragma unroll
      for (int kk = 0; kk < (kSplit ? 0 : kBlockM / kMmaK<T>); ++kk) {
        Frag<T> a_p[kKT], a_ds[kKT];
#pragma unroll
        for (int mt = 0; mt < kKT; ++mt) {
          acc_to_frag(a_p[mt], s[mt], kk);
          acc_to_frag(a_ds[mt], dp[mt], kk);
        }
        dkdv_step(a_p, a_ds, dot_addr, qt_addr, kk);
      }
      // dbias from the S^T layout (unless frag_dbias / kFragShared): stored once in the input
      // dtype (kDirectDbias), a plain add where each element belongs to this thread alone, else float
      // atomics.
      if (kGeneral && !frag_dbias && !kFragShared && (ws.dbias_acc || (kDirectDbias && ws.dbias_direct))) {
        const Strided4& ds_ = p.dbias_s;
        const int64_t tile_off = bi * ds_.b + hi * ds_.h + i0 * ds_.q + key0 * ds_.k;
#pragma unroll
        for (int hm = 0; hm < 2 * kKT; ++hm) {
          const int mt = hm / 2, h = hm % 2;
          const int kr = 16 * mt + lane / 4 + 8 * h;  // key row within the warp's kWarpKeys
          const int64_t row_off = tile_off + kr * ds_.k;
#pragma unroll
          for (int nt = 0; nt < kNS; ++nt) {
#pragma unroll
            for (int x = 0; x < 2; ++x) {
              const int qc = q_l + 8 * nt + x;  // query column within the tile (q_limit counts from q_off)
              if (kr < key_limit && qc - q_off < q_limit) {
                const int64_t off = row_off + qc * ds_.q;
                const float g = dp[mt][nt][2 * h + x];
                if (kDirectDbias && ws.dbias_direct) {
                  static_cast<T*>(p.dbias)[off] = from_acc<T>(g);
                } else if (kAtomicSharedDbias && ws.dbias_shared) {
                  red_add_f32(ws.dbias_acc + off, g);
                } else {
                  ws.dbias_acc[off] += g;
                }
              }
            }
          }
        }
      }
    }
    if constexpr (kF32) {
      static_assert(kFlushK % kBlockM == 0, "flushes at whole query tiles");
      if ((n + 1) % (kFlushK / kBlockM) == 0 && n + 1 < n_iters) {
        write_dkdv();
        zero_dkdv();
        parted = true;
      }
    }
    // dS^T -> shared memory (rounded to T, as the dK product used it)
    constexpr int kChunk = 16 / sizeof(T);
#pragma unroll
    for (int mt = 0; mt < kKT; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNS; ++nt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = kWarpKeys * key_grp + 16 * mt + frag_row(lane, 2 * h), c = q_off + frag_col(lane, nt, 0);
          const int e = swz<kDsCols, kChunk>(r, c / kChunk) + c % kChunk;
          store2(sm.ds + e, dp[mt][nt][2 * h], dp[mt][nt][2 * h + 1]);
          if constexpr (kSplit) store2(sm.pt + e, s[mt][nt][2 * h], s[mt][nt][2 * h + 1]);
        }
      }
    // Every warp's dS^T is in place and every read of the staged tiles done: the next iteration's
    // tiles can load. A block whose warps all skipped the tile has dS = 0: no dQ, no dbias.
    bool block_live = true;
    if constexpr (kKeyMask) {
      block_live = __syncthreads_or(live);
    } else if constexpr (kStaged) {
      block_live = __syncthreads_or(live);
      if (stages == 1 && n + 1 < n_iters) {
        load_scores(n + 1, hi_next, i0_next);
        cp_async_commit_group();
      }
    } else {
      __syncthreads();
    }
    // kSplit: dV += P^T dO, dK += dS^T Q over the tile's queries, for the warp's keys and columns
    // col_off .. + kDn / kSlices - 1: P^T and dS^T as A operands from shared memory.
    if constexpr (kSplit) {
      if (live) {  // (a warp's two halves see the same keys: the same `live`)
        constexpr int kDs16 = kCols16<T, kDsCols>;
        const auto pt_addr = ldsm_a_addr<kDs16>(sm.pt + kWarpKeys * key_grp * kDsCols);
        const auto dst_addr = ldsm_a_addr<kDs16>(sm.ds + kWarpKeys * key_grp * kDsCols);
        const auto dot_addr = TransB<T, kD>(sm.dout[qst]).shifted(col_off / 16);  // dO as B of dV
        const auto qt_addr = TransB<T, kD>(sm.q[qst]).shifted(col_off / 16);      // Q as B of dK
#pragma unroll
        for (int kk = 0; kk < kBlockM / kMmaK<T>; ++kk) {
          Frag<T> a_p[kKT], a_ds[kKT];
#pragma unroll
          for (int mt = 0; mt < kKT; ++mt) {
            ldsm_frag(a_p[mt], pt_addr(mt, kk));
            ldsm_frag(a_ds[mt], dst_addr(mt, kk));
          }
          dkdv_step(a_p, a_ds, dot_addr, qt_addr, kk);
        }
      }
    }
    // One Q / dO stage: the next iteration's tiles load during the dQ step, once no warp reads these.
    if constexpr (Tr::kStages == 1) {
      if (n + 1 < n_iters) {
        __syncthreads();
        prefetch(n + 1, hi_next, i0_next);
        if (stages == 2) load_scores(n + 1, hi_next, i0_next);  // (1 stage: loaded after the dS^T barrier)
        cp_async_commit_group();
      }
    }
    // Deterministic mode: key blocks 0 .. kb - 1 have added this tile's dQ (BwdWorkspace::dq_order).
    static_assert(!kOrdered || (kGeneral && !kStaged), "the ordered dQ: the unstaged general kernel");
    if constexpr (kOrdered) {
      if (threadIdx.x == 0)
        while (ld_acquire_gpu(ws.dq_order + static_cast<int64_t>(bh) * ws.order_ld + i0 / kBlockM) != kb) {
        }
      __syncthreads();
    }
    // dQ[queries 16 dq_mt .., column group] += dS K, added to the float workspace.
    if (block_live) {
      // frag_dbias: dS of this warp's dQ rows (queries i0 + 16 (dq_mt + m) + lane / 4, + 8) read as the dQ
      // step reads it and stored as dbias rows, pairs of adjacent keys from j0 + 2 (lane % 4); the
      // warps of a query m-tile split the 16-key steps kk. Its own loop: a branch inside the dQ
      // loop would keep the compiler from overlapping that loop's loads and mma.
      // kFragShared: the same pairs added to the float accumulator (shared dbias).
      if constexpr (kGeneral && sizeof(T) == 2) {
        // The walk over the pairs of m-tile m (a lambda per m-tile, not a loop over m: the loop
        // changed the one-m-tile kernels' SASS): put(dst, pair, both) with dst in origin's element
        // type, origin dbias's base pointer (direct) or its float accumulator's (shared).
        auto walk_ds_pairs = [&](int m, auto* origin, auto put) {
          const int dq_row = 16 * (dq_mt + m) + lane / 4;
          const int rows_left = clamp_int(p.n_q - i0 - dq_row), keys_left = cols - 2 * (lane % 4);
          auto* const row =
              origin + bi * p.dbias_s.b + hi * p.dbias_s.h + (i0 + dq_row) * p.dbias_s.q + j0 + 2 * (lane % 4);
          for (int kk = warp / Tr::kQG; kk < kBlockN / 16; kk += Tr::kColGroups) {
            uint32_t r[4];  // r[2 x + h]: row g + 8 h, keys 16 kk + 8 x + 2 (lane % 4), + 1
            ldmatrix_x4_trans(r, ds_bases[m] + kk * 16 * kDsCols * 2);
#pragma unroll
            for (int x = 0; x < 2; ++x)
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                const int kc = 16 * kk + 8 * x;
                auto* const dst = row + 8 * h * p.dbias_s.q + kc;
                if (rows_left > 8 * h && kc < keys_left) put(dst, r[2 * x + h], kc + 1 < keys_left);
              }
          }
        };
        if (frag_dbias) {
          T* const base = static_cast<T*>(p.dbias);
          auto store = [dbias_pairs](T* dst, uint32_t v, bool both) {
            if (dbias_pairs && both) {
              *reinterpret_cast<uint32_t*>(dst) = v;
            } else {
              *reinterpret_cast<uint16_t*>(dst) = static_cast<uint16_t>(v & 0xffffu);
              if (both) *reinterpret_cast<uint16_t*>(dst + 1) = static_cast<uint16_t>(v >> 16);
            }
          };
          walk_ds_pairs(0, base, store);
          if constexpr (kDqMT == 2) walk_ds_pairs(1, base, store);
        }
        // kFragShared: the same pairs added to the float accumulator.
        if constexpr (kFragShared) {
          float* const base = ws.dbias_acc;
          auto add = [](float* dst, uint32_t v, bool both) {
            const float2 g = unpack2<T>(v);
            if (both) {
              red_add_v2_f32(dst, g.x, g.y);
            } else {
              red_add_f32(dst, g.x);
            }
          };
          walk_ds_pairs(0, base, add);
          if constexpr (kDqMT == 2) walk_ds_pairs(1, base, add);
        }
      }
      float dq[kDqMT][kNQ][4];
#pragma unroll
      for (int m = 0; m < kDqMT; ++m) zero_acc(dq[m]);
#pragma unroll
      for (int kk = 0; kk < kBlockN / kMmaK<T>; ++kk) {
        Frag<T> a[kDqMT];
        if constexpr (kF32) {  // a0..a3: rows g, g + 8 of the m-tile, reduction index t, t + 4
#pragma unroll
          for (int x = 0; x < 2; ++x)
#pragma unroll
            for (int h = 0; h < 2; ++h) a[0].set(2 * x + h, ld_shared_b32(ds_f32(kk, h, x)));
        } else {
#pragma unroll
          for (int m = 0; m < kDqMT; ++m) ldmatrix_x4_trans(a[m].r, ds_bases[m] + kk * 16 * kDsCols * 2);
        }
#pragma unroll
        for (int np = 0; np < kNQ / 2; ++np) {
          Frag<T> b;
          kt_addr.load(b, kk, np);
          mma_tiles(dq, a, b, np);
        }
      }
      // Unscaled (the conversion multiplies by the scale).
      if constexpr (kSplit) {
        // DqRows16: lane t's columns of n-tiles 2 j, 2 j + 1 are one float4 (with DqTiles this
        // kernel spilled lse / D across the iteration and lost 4-9% at 4k-16k, H200).
        const DqRows16 lay(p);
        constexpr int kGroupCols = kDq / Tr::kColGroups;
        constexpr bool kWarpTest = DqRows16::kColPad % kGroupCols == 0;  // else one test per 16 columns
        static_assert(DqRows16::kRowPad % kBlockM == 0 && (kWarpTest || kGroupCols % 16 == 0),
                      "whole query tiles and column groups in the padded rows");
#pragma unroll
        for (int hm = 0; hm < 2 * kDqMT; ++hm) {
          const int m = hm / 2, h = hm % 2;
          const int64_t i = i0 + 16 * (dq_mt + m) + frag_row(lane, 2 * h);
          float* dst = ws.dq_acc + (bh * lay.rows + i) * lay.ld + dq_col0 + 4 * (lane % 4);
#pragma unroll
          for (int j = 0; j < kNQ / 2; ++j)
            red_add_v4_f32_if((kWarpTest ? dq_col0 : dq_col0 + 16 * j) < d, dst + 16 * j,
                              make_float4(dq[m][2 * j][2 * h], dq[m][2 * j][2 * h + 1], dq[m][2 * j + 1][2 * h],
                                          dq[m][2 * j + 1][2 * h + 1]));
        }
      } else {
        // The DqTiles layout: one red.v4 of a warp's accumulator tile covers 512 contiguous bytes.
        // Tiles wholly past n_q or d are not allocated; rows past n_q inside one add zeros (P = 0).
        const int64_t m_tiles = (p.n_q + 15) / 16;
#pragma unroll
        for (int m = 0; m < kDqMT; ++m) {
          const int64_t mt = i0 / 16 + dq_mt + m;
          float* dst = ws.dq_acc + (static_cast<int64_t>(bh) * m_tiles + mt) * (16 * d) + 16 * dq_col0 + 4 * lane;
#pragma unroll
          for (int nt = 0; nt < kNQ; ++nt)
            red_add_v4_f32_if(mt < m_tiles && dq_col0 + 8 * nt < d, dst + 128 * nt,
                              make_float4(dq[m][nt][0], dq[m][nt][1], dq[m][nt][2], dq[m][nt][3]));
        }
      }
    }
    if constexpr (kOrdered) {  // every thread's adds performed (fence), then the next key block's turn
      __threadfence();
      __syncthreads();
      if (threadIdx.x == 0) red_release_gpu_add(ws.dq_order + static_cast<int64_t>(bh) * ws.order_ld + i0 / kBlockM, 1);
    }
    if constexpr (kBitsAhead) {
      if (n + 1 < n_iters) keep_next = draw_keep(static_cast<uint64_t>(bi * p.h + hi_next), i0_next);
    }
    if (n + 1 < n_iters) store_rows(n + 1);  // stage st ^ 1's lse / D rows (its last reader is done)
    __syncthreads();  // stage st and sm.ds are overwritten next
  };
  // The bounds / diagonal test is needed where the block's keys reach the diagonal of the tile's
  // first query, past n_k, or the tile past n_q. Two copies of the iteration, since ptxas turns a
  // uniform branch around the per-element test into selects that run on every iteration.
  for (int64_t n = 0; n < n_iters; ++n) {
    const int64_t i0 = (first_qt + qt_n) * kBlockM;
    if (kGeneral || (causal && j0 + kBlockN - 1 > i0 + shift) || j0 + kBlockN > p.n_k || i0 + kBlockM > p.n_q) {
      step(n, std::true_type());
    } else {
      step(n, std::false_type());
    }
    if (++qt_n == n_qt) {
      qt_n = 0;
      ++g_n;
    }
  }

  cp_async_wait_group<0>();  // nothing may be in flight at exit (no query tile: K, V still loading)

  write_dkdv();
}

// Key m-tiles per warp of the plain kernels (BwdTraits::kMT). With a key mask (kKeyMask) only when
// kKeyMaskTiles2: its d = 64 kernel spills 130 bytes in the key loop with 2 (ptxas, sm_90a).
template <typename T, int kD>
constexpr int kPlainKeyTiles = sizeof(T) == 2 && kD == 64 ? 2 : 1;
constexpr bool kKeyMaskTiles2 = false;
// The split layout (BwdTraits::kSplit) for the 16-bit plain kernels at d = 128 (at d > 128 it is the
// only one).
constexpr bool kSplitPlain128 = true;
template <typename T, int kD>
constexpr bool kPlainSplit = sizeof(T) == 2 && (kD > 128 || (kSplitPlain128 && kD == 128));

// Which kernel a call takes: the plain one (raw scores, the scale folded into P's exponent:
// scale_foldable, since a masked score's -inf times the scale must stay -inf), the plain one with
// kKeyMask (a key mask alone: key padding), or the general one (bias, dbias, any other mask,
// dropout, other scales).
// drop_plain (the launch's kDropKernels): dropout may take the plain kernels (kDropout).
struct BwdKind {
  bool key_mask, general, dropout;
  BwdKind(const BwdParams& p, bool drop_plain) {
    const bool scale_ok = scale_foldable(p.scale);
    const bool key_only = p.mask && (p.mask_s.q == 0 || p.n_q == 1);  // a mask constant along the queries
    dropout = drop_plain && scale_ok && p.dropout_p > 0.0 && !p.bias && !p.dbias && (!p.mask || key_only);
    key_mask = scale_ok && key_only && !p.bias && !p.dbias && (p.dropout_p == 0.0 || dropout);
    general = !key_mask && !dropout && (p.bias || p.mask || p.dropout_p > 0.0 || p.dbias || !scale_ok);
  }
};

// kDn < kD (native head dims 32, 96, 192): the plain and key-mask kernels run over kDn columns; the
// general kernel pads to kD (above 128: the split layout at 256 with one Q / dO stage, so that the
// staged bias / mask tiles fit beside it on every card with the split kernel's shared memory).
template <typename T, int kD, int kDn = kD>
void launch(const BwdParams& p, void* workspace, cudaStream_t stream) {
  BwdWorkspace ws(p, workspace);
  const int64_t rows = p.b * p.h * p.n_q;
  if (rows > 0) dot_do_o_kernel<T><<<static_cast<unsigned>(ceil_div(rows, 4)), 128, 0, stream>>>(p, ws.dsum);
  // Direct dbias: the elements no iteration reaches (causal tiles that are skipped, tiles the mask
  // hides) must read 0; without causality or a mask every element is written.
  // dbias is the contiguous [b, h, n_q, n_k] tensor ops.cpp allocates (no broadcast dims).
  if (kDirectDbias && ws.dbias_direct && (p.causal != Causal::kNone || p.mask))
    cudaMemsetAsync(p.dbias, 0, static_cast<size_t>(p.b * p.h * p.n_q * p.n_k) * sizeof(T), stream);
  constexpr bool kDropKernels = kSm80BwdDropoutPlain && sizeof(T) == 2 && kDn == kD && kD <= 128;
  const BwdKind kind(p, kDropKernels);
  // Deterministic mode: the general kernel with kOrdered (one instantiation per tile width).
  const bool key_mask = kind.key_mask && !p.deterministic, general = kind.general || p.deterministic;
  const bool drop = kind.dropout && !p.deterministic;
  // The split kernel's dQ accumulator is DqRows16, the others' DqTiles (see there).
  const bool split = kPlainSplit<T, kD> && (!general || kD > 128);
  auto run = [&](auto kernel, auto traits, int64_t smem) {
    using Tk = decltype(traits);
    const int64_t blocks = p.b * p.h_kv * ceil_div(p.n_k, Tk::kBlockN);
    if (blocks == 0) return;
    allow_smem(kernel, smem);
    kernel<<<static_cast<unsigned>(blocks), Tk::kThreads, smem, stream>>>(p, ws);
  };
  if (general) {
    using Tr = std::conditional_t<(kD > 128), BwdTraits<T, 256, 1, true, 256, 1>, BwdTraits<T, kD>>;
    const StagedPlan plan = p.deterministic ? StagedPlan{} : staged_plan<T, Tr>(p);
    // kSm80BwdBiasOnly: a bias alone takes the staged kernels instantiated without mask / dropout
    // code (kBiasOnly); the fragment-walk shared dbias kernel (kSm80FragSharedDbias) is then one of
    // them, so that a shared dbias with a mask or dropout takes the general kernel's atomics.
    constexpr bool kBiasOnlyKernels = kSm80BwdBiasOnly && sizeof(T) == 2 && kD <= 128;
    const bool bias_alone = p.bias && !p.mask && p.dropout_p == 0.0;
    const bool frag_shared = frag_shared_dbias_ok<T, kD>(p, ws) && (!kBiasOnlyKernels || bias_alone);
    ws.score_stages = plan.stages;
    // Rows in 4-byte chunks only (kSm80StageChunks4): the general form, or with
    // kSm80BwdChunks4BiasForms the bias-only / fragment-walk form's twin where that form applies.
    const bool chunks4 = plan.stages && staged_chunk_bytes<T>(p) == 4;
    constexpr bool kFrag = frag_shared_dbias_ok<T, kD>();
    constexpr bool kFormTwins = kSm80BwdChunks4BiasForms && stage_chunks4<T>();
    const bool bias_form = frag_shared || (kBiasOnlyKernels && bias_alone);
    if (p.deterministic) {
      run(sm80_bwd_kernel<T, Tr, true, false, false, true>, Tr(), Tr::kSmemBytes);
    } else if (chunks4 && !(kFormTwins && bias_form)) {
      if constexpr (stage_chunks4<T>())
        run(sm80_bwd_kernel<T, Tr, true, true, false, false, false, false, false, true>, Tr(), plan.bytes);
    } else if (plan.stages && frag_shared) {
      if (!chunks4)
        run(sm80_bwd_kernel<T, Tr, true, true, false, false, kFrag, kBiasOnlyKernels>, Tr(), plan.bytes);
      else if constexpr (kFormTwins)
        run(sm80_bwd_kernel<T, Tr, true, true, false, false, kFrag, kBiasOnlyKernels, false, true>, Tr(), plan.bytes);
    } else if (plan.stages && kBiasOnlyKernels && bias_alone) {
      if (!chunks4)
        run(sm80_bwd_kernel<T, Tr, true, true, false, false, false, kBiasOnlyKernels>, Tr(), plan.bytes);
      else if constexpr (kFormTwins)
        run(sm80_bwd_kernel<T, Tr, true, true, false, false, false, kBiasOnlyKernels, false, true>, Tr(), plan.bytes);
    } else if (plan.stages) {
      run(sm80_bwd_kernel<T, Tr, true, true>, Tr(), plan.bytes);
    } else {
      run(sm80_bwd_kernel<T, Tr, true, false>, Tr(), Tr::kSmemBytes);
    }
  } else {
    using Tr = BwdTraits<T, kD, kPlainKeyTiles<T, kD>, kPlainSplit<T, kD>, kDn>;
    using TrMask = BwdTraits<T, kD, kKeyMaskTiles2 ? kPlainKeyTiles<T, kD> : 1, kPlainSplit<T, kD>, kDn>;
    auto plain = [&](auto traits, auto mask_traits) {
      using Tk = decltype(traits);
      using Tm = decltype(mask_traits);
      if constexpr (kDropKernels) {
        if (drop) {
          if (key_mask)
            run(sm80_bwd_kernel<T, Tm, false, false, true, false, false, false, true>, Tm(), Tm::kSmemBytes);
          else
            run(sm80_bwd_kernel<T, Tk, false, false, false, false, false, false, true>, Tk(), Tk::kSmemBytes);
          return;
        }
      }
      if (key_mask)
        run(sm80_bwd_kernel<T, Tm, false, false, true>, Tm(), Tm::kSmemBytes);
      else
        run(sm80_bwd_kernel<T, Tk, false, false>, Tk(), Tk::kSmemBytes);
    };
    if constexpr (kD > 128) {  // one Q / dO stage where two do not fit (A100)
      using Tr1 = BwdTraits<T, kD, 1, true, kDn, 1>;
      if (Tr::kSmemBytes > max_smem_per_block())
        plain(Tr1(), Tr1());
      else
        plain(Tr(), TrMask());
    } else {
      plain(Tr(), TrMask());
    }
  }
  const DqTiles dqt(p);
  const float scale = static_cast<float>(p.scale);
  if (split) {
    const DqRows16 lay(p);
    const int64_t n_dq = lay.floats(p.b * p.h) / 4;  // one float4 a thread
    if (n_dq > 0)
      dq_rows16_to_dtype_kernel<T><<<static_cast<unsigned>(std::min<int64_t>(ceil_div(n_dq, 256), 65536)), 256, 0,
                                     stream>>>(static_cast<T*>(p.dq), ws.dq_acc, lay, p.n_q, p.d, n_dq, scale);
  } else {
    const int64_t n_dq = dqt.floats(p.b * p.h) / 4;  // one float4 a thread
    if (n_dq > 0)
      dq_to_dtype_kernel<T><<<static_cast<unsigned>(std::min<int64_t>(ceil_div(n_dq, 256), 65536)), 256, 0,
                              stream>>>(static_cast<T*>(p.dq), ws.dq_acc, dqt, p.n_q, p.d, n_dq, scale);
  }
  if (ws.dbias_elems > 0)
    to_dtype_kernel<T><<<static_cast<unsigned>(std::min<int64_t>(ceil_div(ws.dbias_elems, 256), 65536)), 256, 0,
                         stream>>>(static_cast<T*>(p.dbias), ws.dbias_acc, ws.dbias_elems);
}

template <typename T>
void dispatch_dim(const BwdParams& p, void* workspace, cudaStream_t stream) {
  const int64_t dim = p.d > p.d_v ? p.d : p.d_v;
  if constexpr (sizeof(T) == 2) {  // native head dims (16-bit)
    if (dim <= 32) return launch<T, 64, 32>(p, workspace, stream);
    if (dim <= 64) return launch<T, 64>(p, workspace, stream);
    if (dim <= 96) return launch<T, 128, 96>(p, workspace, stream);
    if (dim <= 128) return launch<T, 128>(p, workspace, stream);
    if (dim <= 192) return launch<T, 256, 192>(p, workspace, stream);
    return launch<T, 256>(p, workspace, stream);
  } else {
    if (dim <= 64) return launch<T, 64>(p, workspace, stream);
    return launch<T, 128>(p, workspace, stream);
  }
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

}  // namespace

// Head dims up to 128 (16-bit: 256), 16-byte aligned rows, and, in deterministic mode (dQ added in
// key-block order: BwdWorkspace::dq_order) or without kAtomicSharedDbias, a dbias (if any) whose
// elements each come from one thread: no broadcast over batch, query or key, nor over heads unless
// there is one kv head.
bool sm80_bwd_supported(const BwdParams& p) {
  const bool f32 = p.dtype == Dtype::kFloat32;
  if (p.dtype != Dtype::kFloat16 && p.dtype != Dtype::kBFloat16 && !f32) return false;
  if (p.deterministic && dbias_shared(p)) return false;  // (added with atomics)
  const int64_t max_d = f32 ? 128 : 256;
  if (p.d % 8 || p.d_v % 8 || p.d > max_d || p.d_v > max_d) return false;
  const bool big = p.d > 128 || p.d_v > 128;
  // The tiles must fit the device's shared memory: float32 at d > 64 needs sm_90's 227 KiB, 16-bit
  // at d > 64 145 KiB, the split kernel 161 KiB (A100: 163 KiB; H100 / H200; not the 99 KiB of
  // sm_86 / sm_89 cards: SIMT there), at d > 128 209 KiB (H100 / H200) or, with one Q / dO stage,
  // 145 KiB (A100).
  const bool wide = p.d > 64 || p.d_v > 64;
  const int64_t smem = big    ? BwdTraits<__half, 256, 1, true, 256, 1>::kSmemBytes
                       : f32  ? (wide ? BwdTraits<float, 128>::kSmemBytes : BwdTraits<float, 64>::kSmemBytes)
                       : wide ? std::max(BwdTraits<__half, 128>::kSmemBytes,
                                         BwdTraits<__half, 128, 1, kPlainSplit<__half, 128>>::kSmemBytes)
                              : std::max(BwdTraits<__half, 64>::kSmemBytes,
                                         BwdTraits<__half, 64, kPlainKeyTiles<__half, 64>>::kSmemBytes);
  if (smem > 48 * 1024 && smem > max_smem_per_block()) return false;
  const int64_t strides[] = {p.q_sb, p.q_sh, p.q_sn, p.k_sb, p.k_sh, p.k_sn, p.v_sb, p.v_sh, p.v_sn,
                             p.do_sb, p.do_sh, p.do_sn};
  for (int64_t s : strides)
    if (s % (f32 ? 4 : 8)) return false;
  if (!(aligned16(p.q) && aligned16(p.k) && aligned16(p.v) && aligned16(p.dout))) return false;
  return kAtomicSharedDbias || !dbias_shared(p);
}

int64_t sm80_bwd_workspace_bytes(const BwdParams& p) { return BwdWorkspace(p, nullptr).bytes; }

void sm80_bwd(const BwdParams& p, void* workspace, cudaStream_t stream) {
  if (p.dtype == Dtype::kFloat32) return dispatch_dim<float>(p, workspace, stream);
  if (p.dtype == Dtype::kFloat16) return dispatch_dim<__half>(p, workspace, stream);
  return dispatch_dim<__nv_bfloat16>(p, workspace, stream);
}

}  // namespace flash_mha::cuda
