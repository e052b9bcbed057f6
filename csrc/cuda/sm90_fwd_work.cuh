// Hopper forward (sm90_fwd.cu): configuration flags, tile shapes (Sm90FwdTraits), the work list
// and the consumers' pipeline / softmax state. Included by sm90_fwd.cu only.
#pragma once

#include "common.cuh"
#include "kernels.h"
#include "sm90.cuh"
#include "softmax.cuh"

namespace flash_mha::cuda {
namespace {

// Bias, masks of any broadcast shape and dropout on this path: a kernel instantiation of its own
// (kGeneral), since folding dropout alone into the plain kernel made ptxas spill 728 bytes at
// d = 64. False sends those shapes to the sm80 forward (key masks alone stay on the plain kernel).
constexpr bool kSm90FwdGeneral = true;

// Key-mask bits of a key tile from one 32-bit load per lane (4 adjacent mask bytes: the warp reads
// the tile's 128 bytes at once) and four ballots, where the mask row is contiguous and 4-byte
// aligned; else one byte load per column (the key-padding forward paid ~40% for those, NOTES.md).
constexpr bool kKeyMaskBallot = true;

// A second Q buffer (kQBufs in the traits: d = 64 beside 4 K and 4 V stages, d = 128 beside 3 K
// and 2 V stages instead of 3 and 3), so the next query tile's Q loads while this one runs instead
// of after its last S (the tile boundary waits for that load: NOTES.md, GPU record 2026-11-27
// 12:15, item 3). Correct on an H200 but no faster (plain grid A/B within the run-to-run spread,
// NOTES.md, GPU record 2026-11-27 13:20, item 1): off.
constexpr bool kQDoubleBuffer = false;

// d = 128, non-causal, no mask: key tiles of 176 instead of 128 (2 K / V stages instead of 3, 208
// of 227 KiB): per key the softmax's row reductions, the mbarrier waits and the wgmma wait / issue
// gaps are paid 27% less often, against up to one partly used key tile per query tile
// (FlashAttention-3's d = 128 tile). Key masks stay on the 128 tile (one 32-bit word of keep bits
// per thread covers 2 x 16 column groups); dispatch_dim takes it where n_k > 4096 (measured there).
constexpr bool kWideKeyTile = true;

// A bias broadcast over the batch: work units ordered batch fastest (head, query tile, batch), so
// the batches reading one bias tile run at the same time and share it in L2 (head by head, each
// batch re-read the whole bias from DRAM; the backward orders its items the same way for dbias).
// A/B on an H200 (NOTES.md, GPU record 2026-11-28 19:35): head-broadcast bias forward +10..+15% at
// d = 64 (measured with a third bias stage), +4..+10% at d = 128 (1k-8k, means of two rounds; 16k
// has batch 1). Tried beside it and dropped: an L2 prefetch of the bias tile 4 key tiles ahead
// (0..-4%), that with a third bias stage at d = 64 (-2..-4%), ping-pong in the bias kernel at
// either d (no change).
constexpr bool kFwdBatchFastest = true;

// The bias-only forward at d = 64 (no dropout, no query-varying mask) for n_q > 2048: 3 consumer
// warpgroups in ping-pong (192-row tiles, 160 registers each; ptxas: 48 bytes of spills) as the
// plain d = 64 kernel, instead of 2 without ping-pong. At d = 64 the bias's per-element work
// (read, convert, add) is as long as the tile's GEMMs: with 2 warpgroups the issue slots sat at 50%
// and the tensor pipe at 33% (ncu, H200, head-broadcast bias, 16k). A/B on an H200, two rounds
// (NOTES.md, GPU record 2026-11-29 02:00): head-broadcast bias 16k 300 / 301 against 289 / 289
// TFLOP/s, 4k 309 / 306 against 306 / 304; full bias 16k 298 / 300 against 289 / 286, 4k 288 / 306
// against 277 / 282; but 1k 272 / 273 against 289 / 288 (a 192-row tile wastes 12.5% there),
// hence the bound. Without ping-pong the 3 ran the same.
constexpr bool kFwdBias3WG = true;

// Dropout with no bias and no mask or a key mask: the plain kernel (its traits: no bias ring, the
// key-mask bits) with the dropout draws (kFull in a plain instantiation), instead of the full
// general kernel (which also reads the bias and any mask). d = 64 keeps 2 consumer warpgroups:
// on 3 in ping-pong (160 registers each, as the plain kernel) ptxas spilled 452 bytes (compiled
// only). A/B on an H200 (bf16, dropout 0.1, 1k / 4k / 16k, two rounds, NOTES.md, GPU record
// 2026-11-29 14:30, with kBwdDropoutPlain): forward d64 218 / 232 / 235 TFLOP/s against 181 / 194 /
// 197, d128 324 / 348 / 353 against 262 / 278 / 276.
constexpr bool kFwdDropoutPlain = true;

template <typename T, int kD_, int kBlockN_, int kConsumers_, bool kPingPong_, bool kPersistent_, bool kGeneral_ = false>
struct Sm90FwdTraits {
  static constexpr int kD = kD_;                       // d == d_v
  static constexpr int kConsumers = kConsumers_;       // consumer warpgroups
  static constexpr int kBlockM = 64 * kConsumers;      // a wgmma is 64 rows: one per warpgroup
  static constexpr int kBlockN = kBlockN_;             // keys per tile (S: m64 n kBlockN k16)
  static constexpr int kThreads = 128 * (1 + kConsumers);
  // Register split. setmaxnreg only moves registers within the block's launch allocation, which
  // is the per-thread cap of __launch_bounds__(kThreads, 1) (65536 / kThreads rounded down to a
  // multiple of 8) times kThreads: 168 x 384 = 128 x (24 + 2 x 240) for 2 consumer warpgroups,
  // 128 x 512 = 128 x (32 + 3 x 160) for 3. Asking for more blocks setmaxnreg.inc forever.
  static constexpr int kProducerRegs = kConsumers == 2 ? 24 : 32;
  static constexpr int kConsumerRegs = kConsumers == 2 ? 240 : 160;
  static constexpr int kEntryRegs = (65536 / kThreads) / 8 * 8;
  static_assert(kProducerRegs + kConsumers * kConsumerRegs <= (1 + kConsumers) * kEntryRegs,
                "setmaxnreg split exceeds the block's register allocation");
  static constexpr int kPanel = 64;                    // elements per 128-byte swizzled row
  static constexpr int kPanels = kD / kPanel;
  static constexpr int64_t kSmemLimit = 227 * 1024;
  static constexpr int64_t kQKV2Bytes = 2048 + int64_t{kBlockM} * kD * 2 + 2 * (2 * int64_t{kBlockN} * kD * 2);
  // General kernel: a ring of bias tiles [kBlockM, kBlockN] that the producer loads with TMA
  // (kBlockN / 64 panels of [kBlockM, 64], 128-byte swizzle, as Q), 2 stages next to Q and a
  // double-buffered K/V ring.
  static constexpr bool kGeneral = kGeneral_;
  static constexpr int64_t kBiasStageBytes = int64_t{kBlockM} * kBlockN * 2;
  static constexpr int kBiasFit = static_cast<int>((kSmemLimit - kQKV2Bytes) / kBiasStageBytes);
  static constexpr int kBiasStages = !kGeneral ? 0 : kBiasFit < 2 ? kBiasFit : 2;
  static_assert(!kGeneral || kBiasStages >= 1, "no room for a staged bias tile");
  // K and V rings: as many [kBlockN, kD] tiles as fit next to the Q buffers (and the bias ring) in
  // the 227 KiB of an sm_90 block, half K and half V, up to 4 stages each (with an odd count K
  // gets the extra stage and the producer loads K one key tile ahead of V: V is read a step after
  // K). Q buffers: 2 with kQDoubleBuffer where at least 3 K and 2 V stages remain (d = 64: 4 and
  // 4; d = 128: 3 and 2 instead of 3 and 3), else 1.
  static constexpr int fit_tiles(int q_bufs) {
    return static_cast<int>(
        (kSmemLimit - 2048 - q_bufs * (int64_t{kBlockM} * kD * 2) - kBiasStages * kBiasStageBytes) /
        (int64_t{kBlockN} * kD * 2));
  }
  static constexpr int kQBufs = kQDoubleBuffer && fit_tiles(2) >= 5 ? 2 : 1;
  static constexpr int kKStages = (fit_tiles(kQBufs) + 1) / 2 < 4 ? (fit_tiles(kQBufs) + 1) / 2 : 4;
  static constexpr int kVStages = fit_tiles(kQBufs) / 2 < 4 ? fit_tiles(kQBufs) / 2 : 4;
  static constexpr bool kKAhead = kKStages > kVStages;
  static_assert(kVStages >= 2, "need double-buffered K/V rings");
  static_assert(kBlockN % 16 == 0 && kBlockN <= 256, "key tile: a multiple of 16, at most 256 (TMA box)");
  // Ping-pong: the consumer warpgroups take turns issuing their GEMMs (named barriers
  // kSchedBarrier + warpgroup), so one's softmax runs while the others' GEMMs run.
  static constexpr bool kPingPong = kPingPong_;
  static constexpr int kSchedBarrier = 1;
  // Persistent: one block per SM walks the work list, so the next tile's Q and K/V loads overlap
  // the current tile's last GEMMs and output stores.
  static constexpr bool kPersistent = kPersistent_;
  static constexpr uint32_t kQBytes = kBlockM * kD * sizeof(T);
  static constexpr uint32_t kKVBytes = kBlockN * kD * sizeof(T);
  static_assert(kD % kPanel == 0, "head dim must be whole 64-element panels");

  struct Smem {
    alignas(1024) T q[kQBufs][kBlockM * kD];     // [buffer][kPanels][kBlockM, 64] swizzled
    alignas(1024) T k[kKStages][kBlockN * kD];   // [stage][kPanels][kBlockN, 64] swizzled
    alignas(1024) T v[kVStages][kBlockN * kD];   // [stage][kPanels][kBlockN, 64] swizzled
    alignas(1024) T bias[kGeneral ? kBiasStages : 1][kGeneral ? kBlockM * kBlockN : 8];  // [stage][panel][kBlockM, 64]
  };
  struct Barriers {
    uint64_t q_full[kQBufs], q_empty[kQBufs];
    uint64_t k_full[kKStages], k_empty[kKStages], v_full[kVStages], v_empty[kVStages];
    uint64_t bias_full[kGeneral ? kBiasStages : 1], bias_empty[kGeneral ? kBiasStages : 1];
  };
  // + 1024: the dynamic shared-memory base is only 16-byte aligned; the kernel rounds it up.
  static constexpr int64_t kSmemBytes = sizeof(Smem) + 1024;
  static_assert(kSmemBytes + sizeof(Barriers) <= kSmemLimit, "exceeds the sm_90 shared-memory limit");
};

// ---------------------------------------------------------------------------------------------
// Work list. A work unit is one query tile, or for causal problems on the persistent grid the pair
// of query tiles (k, n_qb - 1 - k) of one head: each pair visits n_qb + 1 key tiles in all, so
// units cost the same and a static round robin stays balanced. (A grid of one block per unit needs
// no pairs: the hardware hands the next unit to whichever SM frees up, and units go heaviest
// first.) Units of one head are consecutive, so the blocks running at one time share a few heads'
// K and V in L2; with a bias broadcast over the batch (kFwdBatchFastest) the batches of one head and
// query tile are consecutive instead, so they share its bias tiles.
// 32-bit indices throughout (sm90_fwd_supported checks the sizes): 64-bit divisions are long
// subroutines, and the producer runs on 32 registers.
struct WorkList {
  int n_qb;        // query tiles per (batch, head)
  int per_head;    // units per (batch, head)
  int units;       // in all
  bool pairs;
  bool batch_fastest;  // kFwdBatchFastest: units (head, k, batch) instead of (batch, head, k)

  __host__ __device__ WorkList(const FwdParams& p, int block_m, bool persistent) {
    n_qb = static_cast<int>((p.n_q + block_m - 1) / block_m);
    pairs = persistent && p.causal != Causal::kNone;
    per_head = pairs ? (n_qb + 1) / 2 : n_qb;
    units = static_cast<int>(p.b * p.h) * per_head;
    batch_fastest = kFwdBatchFastest && p.bias && p.bias_s.b == 0 && p.b > 1;
  }
  // Unit u: (batch * h + head) and its query tiles qb_hi, then (when two) qb_lo; returns 1 or 2.
  __device__ __forceinline__ int tiles(const FwdParams& p, int u, int& bh, int& qb_hi, int& qb_lo) const {
    int k;
    if (batch_fastest) {
      const int b = static_cast<int>(p.b), rest = u / b;
      const int hi = rest / per_head;
      k = rest - hi * per_head;
      bh = (u - rest * b) * static_cast<int>(p.h) + hi;
    } else {
      bh = u / per_head;
      k = u - bh * per_head;
    }
    qb_hi = n_qb - 1 - k;
    qb_lo = k;
    return pairs && qb_lo != qb_hi ? 2 : 1;
  }
};

// One query tile: (batch, head, kv head, first row) and the number of key tiles it visits.
struct TileCoord {
  int bi, hi, kvh, i0;
  int n_tiles;  // 0: every row of the tile sees nothing
  TileCoord() = default;
  __device__ __forceinline__ TileCoord(const FwdParams& p, int bh, int qb, int block_m, int block_n) {
    const int h = static_cast<int>(p.h);
    bi = bh / h;
    hi = bh - bi * h;
    kvh = hi / (h / static_cast<int>(p.h_kv));
    i0 = qb * block_m;
    const int64_t rows = imin(block_m, p.n_q - i0);
    n_tiles = static_cast<int>((visible_key_end(p, i0, rows) + block_n - 1) / block_n);
  }
};


// Pipeline position shared by the producer and every consumer thread: each walks the same work
// list and counts the key tiles (`it`) and query tiles (`q_it`) it has passed. Key tile `it` has
// its K in stage it % kKStages and its V in stage it % kVStages; a stage's barriers complete once
// per use, so use it waits for parity (it / kKStages) & 1 on K's full barrier and the opposite
// parity on its empty one (the first use of a fresh empty barrier passes at once), V likewise.
// Query tile q_it: buffer q_it % kQBufs, parity (q_it / kQBufs) & 1.
struct PipeState {
  uint32_t it = 0, q_it = 0;
};

}  // namespace
}  // namespace flash_mha::cuda
