// Hopper backward (sm90_bwd.cu): configuration, tile shapes (Sm90BwdTraits), the workspace layout,
// and the work items (ItemGrid, BlockWork, for_each_item). Included by sm90_bwd.cu only.
#pragma once

#include <algorithm>

#include "common.cuh"
#include "kernels.h"
#include "sm90.cuh"
#include "sm90_host.h"

namespace flash_mha::cuda {
namespace {

constexpr int kRowPad = 128;  // lse2 / D rows per (batch, head) are padded to this multiple
constexpr int kDqTileFloats = 8192;  // one query tile of dQ: kBlockM x d = 64 x 128 or 128 x 64
// Bias (and its gradient), masks of any broadcast shape and dropout on this path: an instantiation
// of its own of the one-block-per-item kernel (kGeneral). False sends those shapes to the sm80
// backward (key masks alone stay on kKeyMask).
constexpr bool kSm90BwdGeneral = true;
// dbias stored by warps 2, 3 of the producer warpgroup from the dS^T buffer (write_dbias) instead of
// element by element by the consumers. Correct on an H200 (whole suite, stress, fuzz); 8% faster on
// a full bias backward but 9% slower on a head-broadcast one; compute-sanitizer racecheck reports
// RAW hazards between the consumers' dS^T stores and these warps' reads, which the kBarDs protocol
// should exclude, while benchmarks/racecheck_probe.cu (the same protocol, also in this kernel's
// warp layout) is clean. Off until that is understood (NOTES.md, GPU records 2026-11-27 11:20
// item 6 and 12:15 items 1-2).
constexpr bool kDbiasWriterWarps = false;
// A bias with neither a mask nor dropout: the general kernel instantiated without their code
// (kFull = false: no Philox state, no mask bits, the bias adds unpredicated; 3,232 SASS
// instructions against 5,336 at d = 128, and no spill against 4 bytes), as the forward's bias-only
// kernel. A/B on an H200 (NOTES.md, GPU record 2026-11-29 05:30): d = 128 bias backward at 1k / 4k
// / 16k, means of two rounds, full bias +12 / +13 / +15%, head-broadcast +10 / +11 / +13%.
constexpr bool kBwdBiasOnly = true;
// A bias with a key mask (constant along the queries: key padding, as nn.MultiheadAttention's
// key_padding_mask beside a float attn_mask) and no dropout: the bias-only kernel (kFull = false)
// with the plain kernel's key-mask rows (kKeyMask: P^T = 0 on a masked key's rows), instead of the
// full general kernel's mask bits; the forward's bias-only kernel takes key masks already. Adds 4
// kernels (d 64 / 128 x fp16 / bf16). A/B on an H200 (bf16, head-broadcast bias without grad plus
// key padding, 1k / 4k / 16k, two rounds; NOTES.md, GPU record 2026-11-29 10:50): backward d128
// 366-368 / 444-445 / 458-461 TFLOP/s against 271-274 / 312-319 / 335-337, d64 99 / 106 / 107
// against 83 / 88 / 89.
constexpr bool kBwdBiasKeyMask = true;
// General kernel at d = 64: the bias tiles staged by TMA as at d = 128, instead of per-element loads
// by the consumers (the d64 bias backward ran 99-107 TFLOP/s, against ~460 at d128; NOTES.md). A
// [128 queries, 128 keys] tile is 32 KiB and no ring stage has room, so one buffer of its own
// (bias_full / bias_empty: the consumers release it as soon as they have added it to S^T, and the
// next tile loads during the rest of the iteration), and its 32 KiB come from the dQ staging tile,
// which moves into the idle dS^T buffer (Sm90BwdTraits::kDqInDs). A bias that TMA cannot describe
// goes to the sm80 backward. A/B on an H200 (bf16, d 64, 1k / 4k / 16k, two rounds, with
// kBwdDbiasD64; benchmarks/results/H200-ab-sm90-bias-d64-dd3d487.txt): backward TFLOP/s, head-broadcast
// bias without grad + key padding 317 / 362-365 / 375 against 100 / 107-108 / 109; dropout (the dQ
// staging move alone) 124 / 133 / 135 against 99-100 / 105-106 / 108.
constexpr bool kBwdStageBiasD64 = true;
// With kBwdStageBiasD64: a d = 64 bias gradient on this backward instead of the sm80 one (which is
// faster than the per-element-bias kernel, sm90_bwd_supported). Same A/B: full bias 213-215 /
// 238-241 / 243-245 against 140-141 / 156-158 / 164, head-broadcast 199 / 194-196 / 244-246 against
// 132 / 135 / 163-164.
constexpr bool kBwdDbiasD64 = true;
static_assert(!kBwdDbiasD64 || kBwdStageBiasD64, "kBwdDbiasD64 needs kBwdStageBiasD64");

// Dropout with no bias, no dbias and no mask or a key mask: the plain kernel's tile traits with the
// dropout products (kDropout) and the key-mask rows, instead of the full general kernel (the bias
// machinery's traits, the mask bits). Adds 4 kernels (d 64 / 128 x fp16 / bf16), one block per item
// at either d. A/B on an H200 (bf16, dropout 0.1, 1k / 4k / 16k, two rounds; NOTES.md, GPU record
// 2026-11-29 14:30): backward d64 237 / 281 / 295 TFLOP/s against 215 / 249 / 258 (on the persistent
// grid as the plain d64 kernel; its dropout instantiation spills 172 bytes, the one-block one 76),
// d128 354 / 416 / 437 against 311 / 368 / 386; then one block per item at d64 against the
// persistent grid: 251 / 294 / 308-311 against 237 / 279 / 292-296, causal 1k / 4k 193-194 / 269-273
// against 183 / 249-251.
constexpr bool kBwdDropoutPlain = true;
// With kBwdDropoutPlain: the dropout kernel draws the keep bits of its next iteration while this
// one's dK / dV wgmmas run (between the dQ hand-off and the last wait), carried in (kBlockM / 8 + 7)
// / 8 registers, instead of after the dP^T wait, where the draws sit between dP^T and dS^T on every
// iteration's critical path. d = 64 only. A/B on an H200 (bf16, dropout 0.1, non-causal, 1k / 4k /
// 16k, two rounds; NOTES.md, 2026-11-29 17:00): d64 264-265 / 304 / 317 TFLOP/s against 254 / 296-297
// / 310; d128 348-349 / 413-414 / 426-430 against 352-354 / 413-422 / 440-444, so it stays off there.
constexpr bool kBwdDropoutBitsAhead = true;

// dK / dV leave through shared memory: each consumer warpgroup writes its [64 keys, d] parts into
// its own key rows of the two dS^T buffers (free once both warpgroups' last dQ wgmma is done), then
// stores whole 16-byte row chunks, instead of 64 scattered 4-byte stores a thread (ncu, d128 2k:
// 5.7% of warp stalls on the global store queue). One-block-per-item kernels only (consume). A/B on
// an H200 (NOTES.md, GPU record 2026-11-27 13:20, item 7): d = 128 backward +8-14% at 512-1k,
// +2-4% at 2k-4k, +0-1% at 8k-16k; the d = 64 persistent kernel lost 3-9% with it, so it keeps the
// direct stores.
constexpr bool kStagedDkDv = true;

// Plain kernel: the per-tile barrier over both warpgroups' dS^T halves split in two. A warpgroup
// announces its half (named barrier arrive), issues its dV += P^T dO (its own registers and dO),
// and only then waits for the other half before dQ and dK; so the tensor pipe gets that wgmma while
// the other warpgroup still computes its dS (ncu, d128 2k: tensor pipe active 55.6% against
// cuDNN's 63.0%, the gap in the dS phase; NOTES.md). A/B with kDescriptorAdvance on in both (H200,
// 2026-11-27, benchmarks/results/H200-ab-flags-a6bab56.txt): backward +2-4% at d64, 0-1% at d128;
// racecheck and synccheck clean on gpu_smoke.py.
constexpr bool kSplitDsBarrier = true;

// What only the general kernel takes: a bias or its gradient, dropout, or a mask that varies along
// the queries.
inline bool needs_general(const BwdParams& p) {
  return p.bias || p.dbias || p.dropout_p > 0.0 || (p.mask && p.mask_s.q != 0 && p.n_q > 1);
}

// Whether sm90_bwd launches the persistent grid (else one block per work item). Measured on an
// H200 (benchmarks/sm90_bwd_run.sh time, 2026-11-27, bwd TFLOP/s at 1k..16k): d = 64 persistent
// +3..+5% non-causal and causal up to 4k, -5% causal at 8k / 16k; d = 128 -1..-4% non-causal and
// up to -15% causal from 4k on.
inline bool use_persistent(const BwdParams& p) {
  return p.d == 64 && (p.causal == Causal::kNone || p.n_k <= 4096);
}

template <typename T, int kD_, bool kGeneral_ = false>
struct Sm90BwdTraits {
  static constexpr int kD = kD_;                     // d == d_v
  static constexpr int kBlockN = 128;                // keys per block: 64 per consumer warpgroup
  // Query rows per tile: 64 for d = 128 (registers: dK + dV are 128 floats a thread), 128 for
  // d = 64. Either way the dQ product of a warpgroup is one [64, 64] tile (see the header).
  static constexpr int kBlockM = kD == 128 ? 64 : 128;
  static constexpr int kConsumers = 2;
  static constexpr int kThreads = 128 * (1 + kConsumers);
  // setmaxnreg only moves registers within the launch allocation: cap 65536 / 384 = 170 -> 168
  // a thread; 24 + 2 x 240 = 504 = 3 x 168 (NOTES.md: over-asking hangs setmaxnreg.inc).
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  static constexpr int kEntryRegs = (65536 / kThreads) / 8 * 8;
  static_assert(kProducerRegs + kConsumers * kConsumerRegs <= (1 + kConsumers) * kEntryRegs,
                "setmaxnreg split exceeds the block's register allocation");
  static constexpr int kPanel = 64;                  // elements per 128-byte swizzled row
  static constexpr int kPanels = kD / kPanel;
  static_assert(kD % kPanel == 0 && kBlockM % 64 == 0, "whole 64-element panels");
  static_assert(kBlockM <= kRowPad && kRowPad % kBlockM == 0, "lse2 / D padding covers every tile");
  // dQ split between the two consumer warpgroups: one [64 rows, 64 columns] wgmma tile each.
  static constexpr bool kDqSplitRows = kBlockM == 128;  // else split the columns (kD == 128)
  static_assert(kDqSplitRows ? kD == 64 : (kBlockM == 64 && kD == 128), "dQ tile split");
  static_assert(kBlockM * kD == kDqTileFloats && kDqTileFloats == 8 * 4 * 128 * kConsumers,
                "a dQ tile is 8 float4 per consumer thread");
  static constexpr int kDqSyncThreads = 128 * kConsumers + 32;  // consumers + the dQ writer warp

  static constexpr uint32_t kKVBytes = kBlockN * kD * sizeof(T);
  static constexpr uint32_t kQBytes = kBlockM * kD * sizeof(T);
  static constexpr uint32_t kRowBytes = kBlockM * sizeof(float);
  static constexpr uint32_t kStageBytes = 2 * kQBytes + 2 * kRowBytes;  // Q, dO, lse2, D

  static constexpr int64_t kSmemLimit = 227 * 1024;
  static constexpr int64_t kFixedBytes =
      2 * int64_t{kKVBytes} + 2 * int64_t{kBlockN} * kBlockM * 2 + int64_t{kDqTileFloats} * 4 + 2048;
  static constexpr int kFitStages = static_cast<int>((kSmemLimit - kFixedBytes) / kStageBytes);
  static constexpr int kStages = kFitStages < 3 ? kFitStages : 3;
  static_assert(kStages >= 2, "need a double-buffered Q / dO ring");

  // General kernel at d = 128: the bias tile [kBlockM queries, kBlockN keys] of each iteration
  // rides in its ring stage (TMA, 2 panels of [kBlockM, 64] keys, 128-byte swizzle; the stage's
  // full barrier counts its bytes). 2 x 16 KiB fit next to the rest; at d = 64 (32 KiB a tile)
  // they do not: with kBwdStageBiasD64 one tile buffer of its own (kBiasInRing = false, its own
  // barriers), in the bytes of the dQ staging tile, which then lives in the dS^T buffer the current
  // tile does not use (kDqInDs); else the consumers load the bias elements themselves.
  static constexpr bool kStageBias = kGeneral_ && (kD == 128 || kBwdStageBiasD64);
  static constexpr bool kBiasInRing = kStageBias && kD == 128;
  static constexpr bool kDqInDs = kStageBias && !kBiasInRing;
  static constexpr uint32_t kBiasBytes = kStageBias ? kBlockM * kBlockN * sizeof(T) : 0;
  static_assert(!kDqInDs || kBlockN * kBlockM * sizeof(T) == kDqTileFloats * 4, "dQ staging fits a dS^T buffer");

  struct SmemCore {
    alignas(1024) T k[kBlockN * kD];                 // [kPanels][kBlockN, 64] swizzled
    alignas(1024) T v[kBlockN * kD];                 // [kPanels][kBlockN, 64] swizzled
    alignas(1024) T q[kStages][kBlockM * kD];        // [stage][kPanels][kBlockM, 64] swizzled
    alignas(1024) T dout[kStages][kBlockM * kD];     // [stage][kPanels][kBlockM, 64] swizzled
    alignas(1024) T ds[2][kBlockN * kBlockM];        // dS^T [buf][kBlockM / 64][kBlockN, 64] swizzled
    alignas(16) float lse2[kStages][kBlockM];        // [stage][query] lse log2(e), +inf past n_q
    alignas(16) float dsum[kStages][kBlockM];        // [stage][query] D
  };
  struct SmemPlain : SmemCore {
    alignas(128) float dq[kDqTileFloats];            // dQ tile staging, fragment order (convert kernel)
  };
  struct SmemBias : SmemPlain {
    alignas(1024) T bias[kStages][kBlockM * kBlockN];  // [stage][2][kBlockM, 64] swizzled
  };
  struct SmemBiasDqInDs : SmemCore {
    alignas(1024) T bias[1][kBlockM * kBlockN];  // [2][kBlockM, 64] swizzled (bias_full / bias_empty)
  };
  using Smem = std::conditional_t<kDqInDs, SmemBiasDqInDs, std::conditional_t<kStageBias, SmemBias, SmemPlain>>;
  // The dQ staging tile of iteration t: its own buffer, or (kDqInDs) dS^T buffer (t + 1) & 1, which
  // iteration t does not use (sm90_bwd.cu: consume and write_dq order its reuse).
  __device__ static float* dq_stage(Smem& sm, int t) {
    if constexpr (kDqInDs)
      return reinterpret_cast<float*>(sm.ds[(t + 1) & 1]);
    else
      return sm.dq;
  }
  struct BarriersCore {
    uint64_t kv_full;
    uint64_t full[kStages], empty[kStages];
    uint64_t kv_empty;  // persistent kernel only: the consumers are done with K / V
  };
  struct BarriersBias : BarriersCore {
    uint64_t bias_full, bias_empty;  // kDqInDs: the bias tile buffer
  };
  using Barriers = std::conditional_t<kDqInDs, BarriersBias, BarriersCore>;
  static constexpr int64_t kSmemBytes = sizeof(Smem) + 1024;  // + 1024: the kernel aligns the base
  static_assert(kSmemBytes + sizeof(Barriers) <= kSmemLimit, "exceeds the sm_90 shared-memory limit");
};

// Workspace: dq_acc [b, h, n_qt, kDqTileFloats] float32 (zeroed by the prep kernel; each query tile in
// the consumers' fragment order, see sm90_bwd_convert_kernel), lse2 and dsum [b, h, n_q_pad];
// general kernel with a broadcast dbias: its float accumulator (dbias's shape) after them.
// Deterministic mode (p.deterministic) adds, after those:
//  - dq_order [b, h, n_qt] int32 (zeroed by the prep kernel): how many key blocks have added into
//    each dQ tile. The key blocks that see a query tile are 0 .. K (BlockWork: first_qt grows with
//    the key block), so key block kb adds once the count is kb (write_dq): a fixed order;
//  - where blocks share dbias elements (dbias_shared): dbias_full [b, h, n_q, n_k] in the input
//    dtype, which the kernel stores dS into element by element instead of the float atomics; a
//    reduce kernel then sums it over the broadcast dims in a fixed order (no float accumulator).
//    Capped at kMaxDbiasFullBytes; a dbias broadcast over the keys is left to the SIMT backward
//    (sm90_bwd_supported). Deterministic mode runs the one-block-per-item grid (sm90_bwd_variant).
struct Sm90BwdWorkspace {
  static constexpr int64_t kMaxDbiasFullBytes = int64_t{4} << 30;
  float* dq_acc;
  float* lse2;
  float* dsum;
  int* dq_order = nullptr;
  void* dbias_full = nullptr;
  int64_t n_q_pad;
  int64_t n_qt;  // query tiles per (batch, head)
  int64_t bytes;
  Sm90BwdWorkspace(const BwdParams& p, void* base) {
    n_q_pad = align_up(p.n_q > 0 ? p.n_q : 1, kRowPad);
    const int64_t block_m = kDqTileFloats / (p.d == 128 ? 128 : 64);  // Sm90BwdTraits::kBlockM
    n_qt = ceil_div(p.n_q > 0 ? p.n_q : 1, block_m);
    const int64_t dq_bytes = align_up(p.b * p.h * n_qt * kDqTileFloats * 4, 256);
    const int64_t row_bytes = align_up(p.b * p.h * n_q_pad * 4, 256);
    char* c = static_cast<char*>(base);
    dq_acc = reinterpret_cast<float*>(c);
    lse2 = reinterpret_cast<float*>(c + dq_bytes);
    dsum = reinterpret_cast<float*>(c + dq_bytes + row_bytes);
    bytes = dq_bytes + 2 * row_bytes;
    if (kSm90BwdGeneral && p.dbias && !dbias_once(p) && !materialized_dbias(p))
      bytes += align_up(dbias_elems(p) * 4, 256);
    if (p.deterministic) {
      dq_order = reinterpret_cast<int*>(c + bytes);
      bytes += align_up(p.b * p.h * n_qt * 4, 256);
    }
    if (materialized_dbias(p)) {
      dbias_full = c + bytes;
      bytes += align_up(dbias_full_bytes(p), 256);
    }
  }
  static bool materialized_dbias(const BwdParams& p) { return p.deterministic && dbias_shared(p); }
  static int64_t dbias_full_bytes(const BwdParams& p) { return p.b * p.h * p.n_q * p.n_k * 2; }
  // General kernel: float dbias accumulator right after dsum (when dbias is not stored directly:
  // a broadcast dbias, summed by atomics or by one thread across a GQA group; dbias_elems(p)
  // floats), then converted.
  __host__ __device__ float* dbias_acc(const BwdParams& p) const {
    return dsum + align_up_elems(p.b * p.h * n_q_pad, 64);
  }
  __host__ __device__ static int64_t align_up_elems(int64_t a, int64_t b) { return (a + b - 1) / b * b; }
};

// Sizes that place the work items. The persistent kernel reads them from the host (a kernel
// parameter): constant-bank operands cost its 24-register producer nothing, where copies derived in
// the kernel are held, and spilled, across its items. The one-item kernel derives them in place.
struct ItemGrid {
  int n_kb, heads, items, group, n_qb;
  int band;       // causal: (batch, kv head) pairs per band of the item order; non-causal: 0 =
                  // batch fastest (general kernel), else unused (see BlockWork)
  int64_t shift;  // causal_shift
  ItemGrid(const BwdParams& p, int block_m, int block_n)
      : n_kb(static_cast<int>(ceil_div(p.n_k, block_n))),
        heads(static_cast<int>(p.b * p.h_kv)),
        items(n_kb * heads),
        group(static_cast<int>(p.h / p.h_kv)),
        n_qb(static_cast<int>(ceil_div(p.n_q, block_m))),
        band(item_band(p, n_kb, heads)),
        shift(causal_shift(p)) {}
  // About one SM's worth of items per band: the blocks running at once come from a few heads, whose
  // Q / dO rows and dQ accumulator stay in L2 (with key block slowest over every head, the blocks
  // running at once each add into a different head's dQ and ~2/3 of those adds went to DRAM).
  // Non-causal with a dbias broadcast over the batch (general kernel only): 0, batch fastest, so
  // that the batches' reductions into one float accumulator tile come close in time and meet in L2
  // (key block fastest, they were ~500 items apart and every reduction went to DRAM).
  static int item_band(const BwdParams& p, int n_kb, int heads) {
    if (p.causal == Causal::kNone) return p.dbias && p.dbias_s.b == 0 && p.b > 1 ? 0 : heads;
    if (n_kb == 0) return heads;
    return static_cast<int>(std::min<int64_t>(heads, ceil_div(sm_count(), n_kb)));
  }
};

// One item's work: (batch, kv head, key block) and its iterations (query head of the group x
// query tile from first_qt on). 32-bit: sm90_bwd_supported bounds the sizes.
struct BlockWork {
  int bi, kvh, kb, j0;
  int group, first_qt, n_qt, n_iters;
  // g: the sizes from the host (persistent kernel), or nullptr: derived from p here. band: ItemGrid.
  // batch_order: the general kernel, whose non-causal band 0 means batch fastest (the plain
  // kernels never see it).
  __device__ __forceinline__ BlockWork(const BwdParams& p, const ItemGrid* g, int band, int item, int block_m,
                                       int block_n, bool batch_order = false) {
    const int n_kb = g ? g->n_kb : static_cast<int>((p.n_k + block_n - 1) / block_n);
    const int heads = g ? g->heads : static_cast<int>(p.b * p.h_kv);
    // Causal: key block 0 has the most query tiles; the items go in bands of `band` heads, inside
    // a band heaviest first (key block slowest). Otherwise the key blocks of one head are neighbours,
    // so they share its Q / dO in L2; band 0 (non-causal): the batch fastest, then the key block
    // (ItemGrid::item_band says when).
    int bkv;
    if (p.causal != Causal::kNone) {
      const int bi0 = item / (band * n_kb) * band;  // first head of the item's band
      const int in_band = min(band, heads - bi0);   // heads in it (the last may be short)
      const int rem = item - bi0 * n_kb;
      kb = rem / in_band;
      bkv = bi0 + rem - kb * in_band;
    } else if (batch_order && band == 0) {
      const int b = static_cast<int>(p.b), rest = item / b;
      kb = rest % n_kb;
      bkv = (item - rest * b) * static_cast<int>(p.h_kv) + rest / n_kb;
    } else {
      bkv = item / n_kb;
      kb = item - bkv * n_kb;
    }
    bi = bkv / static_cast<int>(p.h_kv);
    kvh = bkv - bi * static_cast<int>(p.h_kv);
    j0 = kb * block_n;
    group = g ? g->group : static_cast<int>(p.h / p.h_kv);
    int64_t first_row = 0;  // first_row_seeing(p, j0)
    if (p.causal != Causal::kNone) {
      const int64_t r = j0 - (g ? g->shift : causal_shift(p));
      first_row = r < 0 ? 0 : (r > p.n_q ? p.n_q : r);
    }
    first_qt = static_cast<int>(first_row / block_m);
    const int n_qb = g ? g->n_qb : static_cast<int>((p.n_q + block_m - 1) / block_m);
    n_qt = first_row < p.n_q ? n_qb - first_qt : 0;  // no query sees the block: no iteration
    n_iters = n_qt > 0 ? group * n_qt : 0;
  }
  // Iteration n: query head and first query row.
  __device__ __forceinline__ void at(int n, int block_m, int& hi, int& i0) const {
    const int g = n / n_qt;
    hi = kvh * group + g;
    i0 = (first_qt + (n - g * n_qt)) * block_m;
  }
};

// Calls f(w, tile, kv) for each work item of this block in order: `first` (item blockIdx.x)
// alone, or (persistent) one item of each round of gridDim.x items (below).
// tile: iterations of the block's earlier items; kv: its earlier items with iterations. Every role
// walks the same items, so all agree on both, and the barrier phases run on across items:
//  - Ring: iteration t = tile + n uses stage t % kStages; full / empty complete one phase per use
//    of their stage, so the consumers wait full parity (t / kStages) & 1 and the producer waits
//    empty parity ((t / kStages) & 1) ^ 1 (the release of iteration t - kStages; a fresh barrier
//    passes it at once). dS^T buffer t & 1 (see consume).
//  - K / V (persistent): item number kv with iterations loads on kv_full phase kv (consumers wait
//    parity kv & 1) once kv_empty phase kv - 1 has completed (all 256 consumer threads are done
//    with the previous load; parity (kv & 1) ^ 1, passed at once by the fresh barrier for kv = 0).
//    Each phase of one barrier needs the other's previous phase, so no waiter is two phases behind.
//  - dQ staging: one "empty" / "full" handshake per iteration, in iteration order (see write_dq).
//  - Items without iterations touch no barrier and advance neither count.
template <bool kPersistent, typename F>
__device__ __forceinline__ void for_each_item(const BwdParams& p, const ItemGrid& g, const BlockWork& first,
                                              int block_m, int block_n, F&& f) {
  if constexpr (!kPersistent) {
    f(first, 0, 0);
  } else {
    // Round r takes items [r gridDim.x, (r + 1) gridDim.x), block b the b-th of them in even rounds
    // and the b-th from the end in odd ones: a causal band puts heavy items on low blocks, so a
    // block's heavy and light items alternate.
    int tile = 0, kv = 0;
    const int rounds = (g.items + gridDim.x - 1) / gridDim.x;
    for (int r = 0; r < rounds; ++r) {
      const int item = r * gridDim.x + ((r & 1) ? gridDim.x - 1 - blockIdx.x : blockIdx.x);
      if (item >= g.items) continue;
      const BlockWork w(p, &g, g.band, item, block_m, block_n);
      f(w, tile, kv);
      tile += w.n_iters;
      kv += w.n_iters > 0;
    }
  }
}

}  // namespace
}  // namespace flash_mha::cuda
