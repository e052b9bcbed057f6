// Tensor-core forward for float16 / bfloat16 (sm_80+, mma.sync m16n8k16, fp32 accumulation) and
// float32 (mma.sync m16n8k8 on tf32, each product as three: 3xTF32, see Frag<float> in sm80_tile.cuh).
//
// One block of 4 warps per (batch, head, query tile of 128 rows; 64 for d = 256 and for float32);
// each warp owns 32 (16) consecutive rows as two (one) m16 tiles.
// K/V tiles of kBlockN keys stream through shared memory with cp.async, double buffered: tile t+1
// is in flight while tile t is used. Per tile: S = Q K^T (ldmatrix + mma), the score epilogue and
// online softmax in the log2 domain, dropout on the probabilities, then O += P V with P taken
// straight from the S accumulators. Causal tiles past the diagonal are never loaded.
// Head dims (d and d_v, multiples of 8) are padded with zeros up to a native width kDn in {32, 64,
// 96, 128, 160, 192, 256} (plain and key-mask kernels, 16-bit) or the tile width kD in {64, 128, 256}
// (the general kernel; float32: 64, 128).
#include "kernels.h"
#include "sm80_tile.cuh"
#include "softmax.cuh"

namespace flash_mha::cuda {
namespace {

// The general kernel at d = 256 (d 160 / 192 / 256, 16-bit) stages the bias / mask tiles as the
// d <= 128 one does, instead of reading them per element from global memory (the bias forward ran
// 93-98 TFLOP/s that way, slower than its backward's 154-175; H200, bf16, NOTES.md). Its shared memory grows from 96 to
// 112 KiB a block: two blocks still fit an H100 / H200 SM (2 x (112 + 1) of 228 KiB), one an A100's
// as before. Adds 2 kernels. A/B on an H200 (bf16, d 256, 1k / 4k / 16k, two rounds; NOTES.md, GPU
// record 2026-11-29 10:50): head-broadcast bias forward 221 / 237 / 243 TFLOP/s against 96 / 96 / 99;
// the bias with a key mask 247 / 268 / 273 against 98 / 97 / 98.
constexpr bool kSm80FwdStageD256 = true;

// Dropout without a bias and without a query-varying mask (dropout alone, or with key padding whose
// rows key_mask_ok takes) runs on the plain kernels with kDropout (16-bit, d = 64 and 128; the wide
// key tile where it fits, as the plain kernels) instead of the general kernel: the folded scale, the
// lazy rescale, the wide tile. The draws are the general kernel's, applied to P packed to 16 bits
// (dropout_packed_step; ptxas, sm_90a: the wide d64 / d128 dropout kernels spill 156 / 56 bytes that
// way, 784 / 240 with the draws on the float scores). Adds 14 kernels. A/B on an H200 (bf16, dropout
// 0.1, sm80 forced, 1k / 4k / 16k, two rounds; NOTES.md, 2026-11-29 15:45): forward d64 198 / 212 /
// 215 TFLOP/s against 170 / 182 / 186, d128 265 / 285 / 290 against 217 / 238 / 247; the narrow key
// tiles only (12 / 24 bytes of spill) 196 / 208 / 211 and 233 / 250 / 255.
constexpr bool kSm80FwdDropoutPlain = true;

// The narrow key-mask kernels stage a tile's mask bytes with one byte load a thread (issued with the
// next tile's K / V, stored to shared memory at the end of the step, so that the load has the tile's
// work to land) instead of 16-byte cp.async chunks, so that a key mask of any length, base and
// strides takes them: nn.MultiheadAttention's key_padding_mask at an n_k off a multiple of 16 (e.g.
// 1000) took the general kernel, 6x slower. The wide d128 key-mask kernel keeps the chunks (with
// bytes it ran 6-8% slower), so such a mask takes it only where the chunks are whole and aligned,
// else the narrow one. A/B on an H200 (bf16, sm80 forced, key padding; NOTES.md, 2026-11-29 17:15),
// with bytes in every key-mask kernel: forward at n_k = 1000 (16 x 2048 / d heads) d64 0.450 ms
// against 2.870 (the general kernel), d128 0.373 against 1.759, with dropout 0.623 / 3.115 and
// 0.482 / 1.883; at 1k / 4k / 16k d64 306 / 340 / 348 TFLOP/s either way, d128 369-370 / 425-426 /
// 437 against 401-402 / 451-453 / 461-465 (the wide kernel).
constexpr bool kSm80FwdKeyMaskBytes = true;

template <typename T, int kD_, bool kWide_ = false, int kDn_ = kD_>
struct FwdTraits {
  // kD: the shared tiles' width (64, 128, 256: the swizzle takes rows of 8 16-byte chunks and more);
  // kDn: the columns the mma loops run over (a native head dim, kDn <= kD, a multiple of 16). Columns
  // [kDn, kD) of the tiles are never read: d = 96 computes 96 columns in tiles 128 wide.
  static constexpr int kD = kD_;
  static constexpr int kDn = kDn_;
  static_assert(kDn % 16 == 0 && kDn <= kD, "kDn: a multiple of 16, at most kD");
  // kWide: the plain kernels' wider key tile (16-bit only; see kBlockN).
  static constexpr bool kWide = kWide_;
  static_assert(!kWide || (sizeof(T) == 2 && kD <= 128), "the wide key tile is for 16-bit d = 64, 128");
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  // m16 row tiles per warp: two tiles share every K and V fragment read from shared memory (half
  // the ldmatrix traffic per mma). d = 256 keeps one: its [16, 256] output tile is 128 registers;
  // so does float (its split fragments need the registers: 192 bytes of spill at d = 64 with two).
  static constexpr int kMT = kD <= 128 && sizeof(T) == 2 ? 2 : 1;
  static constexpr int kBlockM = 16 * kMT * kWarps;
  // Key tile: 64 for d = 64; 32 above, where a 64-key score tile next to the output accumulators
  // spills registers in the general kernel (d = 128: 2 x 64 output + 2 x 32 score registers per
  // thread). The plain kernels at d = 128 take 64 (kWide) where two 96 KiB blocks fit an SM: with
  // the loader's registers freed (TileStream) they spill 52 bytes (4 loads / stores in the key
  // loop; 100 bytes with kKeyMask), and paying the per-tile costs (softmax reductions, barriers,
  // loads) per 64 keys took the forward from 0.81-0.83x to 0.90-0.95x SDPA FLASH (H200, bf16,
  // 1k-16k, before the key loop was split; NOTES.md). At d = 64 the plain kernel's wide tile is 128
  // keys (100 bytes of spill: 4 local loads and 4 stores per tile in the key loop; per-tile costs
  // per 128 keys as FA2 has them): forward 0.96-1.02x -> 0.99-1.09x SDPA FLASH (H200, bf16, 1k-16k).
  static constexpr int kBlockN = kD <= 64 ? (kWide ? 128 : 64) : kWide ? 64 : 32;
  // Blocks per SM the register allocation must allow (1: up to 255 registers per thread).
  static constexpr int kMinBlocks = 1;
  // Skip the mma steps of all-zero padding columns (d, d_v < kD). A runtime branch splits the
  // unrolled loops into basic blocks the scheduler cannot overlap, so by default the padding is
  // multiplied like real data (zeros, same result).
  static constexpr bool kGuardDims = false;
  struct Smem {
    T q[kBlockM * kD];     // [kBlockM, kD] swizzled
    T k[2][kBlockN * kD];  // [stage][kBlockN, kD] swizzled
    T v[2][kBlockN * kD];  // [stage][kBlockN, kD] swizzled
  };
  static_assert(sizeof(Smem) <= 110 * 1024, "two forward blocks should fit an H100 SM");
  static_assert(sizeof(T) == 2 || kD <= 128, "float32 takes head dims up to 128");
  // The general kernel's bias / mask tiles, double buffered with K / V (cp.async chunks),
  // placed after Smem and allocated for that kernel only. Rows padded by 16 bytes: the fragment
  // reads of 8 rows x 4 lanes hit 32 distinct banks (16-bit; float's per-element reads see 2-way
  // conflicts). Float at d = 256 reads per element instead (smem), and 16-bit there too without
  // kSm80FwdStageD256.
  static constexpr bool kStage = (kD <= 128 || (kSm80FwdStageD256 && sizeof(T) == 2)) && !kWide;
  static constexpr int kBiasLd = kBlockN + 16 / sizeof(T), kMaskLd = kBlockN + 16;
  struct Staged {
    T bias[2][kBlockM * kBiasLd];
    uint8_t mask[2][kBlockM * kMaskLd];
  };
  static constexpr int64_t kStagedOffset = (sizeof(Smem) + 127) / 128 * 128;
  static constexpr int64_t kGeneralSmem = kStagedOffset + sizeof(Staged);  // used when kStage only
  static constexpr int64_t smem_bytes(bool staged) { return staged ? kGeneralSmem : sizeof(Smem); }
  // The key-mask kernel's mask rows (kBlockN bytes per stage) after Smem.
  static constexpr int64_t kKeyMaskSmem = kStagedOffset + 2 * kBlockN;
  static_assert(!kStage || sizeof(T) == 4 || kGeneralSmem <= (kD <= 128 ? 110 : 112) * 1024,
                "two staged forward blocks should fit an H100 SM");  // float: checked at launch
};

// Whether the general kernel can stage the bias and mask (those present) in shared memory: 16-byte
// chunks of a row must be whole and aligned (unit key stride; batch / head / query strides, n_k and
// the base in multiples of 16 bytes), or 4-byte ones for the kChunks4 kernel (staged_chunk_bytes),
// and the tiles must fit the device. Otherwise both are read per element from global memory.
// float32 stages only a bias: its staged tiles take 120-124 KiB, one block per SM where the
// unstaged kernel runs two, which pays for a mask alone (key padding, 4k: +8% forward at d64, +14%
// at d128) but not for a bias (d64: staged 23 TFLOP/s, unstaged 18; d128 25 / 26; H200, two
// rounds).
template <typename T, typename Tr>
bool scores_stageable(const FwdParams& p) {
  if (sizeof(T) == 4 && !p.bias) return false;
  if (Tr::smem_bytes(true) > 48 * 1024 && Tr::smem_bytes(true) > max_smem_per_block()) return false;
  return Tr::kStage && (p.bias || p.mask) && staged_chunk_bytes<T>(p) != 0;
}

// Whether a key mask's rows come in whole, aligned 16-byte chunks of the key tile, as the key-mask
// kernels that stage them with cp.async (the wide ones: key_mask_bytes) need. The query stride does
// not count: the mask is constant along the queries, or there is one.
inline bool key_mask_chunks(const FwdParams& p) {
  Strided4 m = p.mask_s;
  m.q = 0;
  return score_chunk_bytes(p.mask, m, p.n_k, 1) == 16;
}

// Whether the key-mask kernel of traits Tr stages the mask rows with byte loads (any layout).
template <typename Tr>
constexpr bool key_mask_bytes() { return kSm80FwdKeyMaskBytes && !Tr::kWide; }

// Whether the plain kernel with kKeyMask takes the call: a mask constant along the queries (key
// padding, per batch and / or head) and nothing else general, in a layout the narrow key-mask
// kernel stages (key_mask_bytes, key_mask_chunks). with_dropout: the key-mask kernel with kDropout
// takes dropout too.
template <typename Tr>
bool key_mask_ok(const FwdParams& p, bool with_dropout = false) {
  return p.mask && !p.bias && (with_dropout || p.dropout_p == 0.0) && (p.mask_s.q == 0 || p.n_q == 1) &&
         (key_mask_bytes<Tr>() || key_mask_chunks(p));
}

// Whether any byte of a staged mask's rows [row0, row0 + kRows) (one row when ld == 0) x kBlockN keys
// is nonzero, over this lane's 16-byte chunks (the caller ORs the warp's lanes).
template <int kBlockN, int kRows>
__device__ __forceinline__ bool staged_mask_any(const uint8_t* mask, int row0, int ld, int lane) {
  constexpr int kChunks = kBlockN / 16;
  const int n = (ld == 0 ? 1 : kRows) * kChunks;
  uint32_t any = 0;
  for (int c = lane; c < n; c += 32) {
    const uint4 v = *reinterpret_cast<const uint4*>(mask + (row0 + c / kChunks) * ld + (c % kChunks) * 16);
    any |= v.x | v.y | v.z | v.w;
  }
  return any != 0;
}

// kKeyMask (with !kGeneral): the plain kernel plus a key mask (a mask constant along the queries, no
// bias: key padding), its rows staged with K / V (key_mask_ok).
// kDropout (with !kGeneral; kSm80FwdDropoutPlain): the plain kernel plus dropout.
// kGeneral: bias, mask or dropout present (Philox, and the bias / mask staged in shared memory when
// kStaged, else loaded per element; by 4-byte cp.async chunks with kChunks4, else 16-byte ones);
// otherwise the score epilogue is a multiply plus, on bound / diagonal tiles only, an integer
// visibility test.
template <typename T, typename Tr, bool kGeneral, bool kStaged, bool kKeyMask = false, bool kDropout = false,
          bool kChunks4 = false>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocks) sm80_fwd_kernel(const FwdParams p) {
  static_assert(!kDropout || !kGeneral, "kDropout: the plain kernels (the general one draws at run time)");
  static_assert(!kChunks4 || kStaged, "kChunks4: the staged general kernel");
  constexpr int kChunkBytes = kChunks4 ? 4 : 16;  // of the staged bias / mask tiles
  constexpr int kD = Tr::kD, kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN, kThreads = Tr::kThreads;
  constexpr int kMT = Tr::kMT;
  constexpr int kNS = kBlockN / 8;    // score n-tiles per m-tile
  constexpr int kNO = Tr::kDn / 8;    // output n-tiles per m-tile
  extern __shared__ __align__(128) unsigned char smem_raw[];
  auto& sm = *reinterpret_cast<typename Tr::Smem*>(smem_raw);

  // Heaviest (last, for causal) query tiles first.
  const int64_t n_qb = (p.n_q + kBlockM - 1) / kBlockM;
  int64_t blk = blockIdx.x;
  const int64_t qb = n_qb - 1 - blk % n_qb;
  blk /= n_qb;
  const int64_t hi = blk % p.h, bi = blk / p.h;
  const int64_t kvh = hi / (p.h / p.h_kv);
  const int64_t i0 = qb * kBlockM;
  const int rows = static_cast<int>(imin(kBlockM, p.n_q - i0));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int d = static_cast<int>(p.d), dv = static_cast<int>(p.d_v);

  const T* qg = static_cast<const T*>(p.q) + bi * p.q_sb + hi * p.q_sh + i0 * p.q_sn;  // [rows, d]
  const T* kg = static_cast<const T*>(p.k) + bi * p.k_sb + kvh * p.k_sh;              // [n_k, d]
  const T* vg = static_cast<const T*>(p.v) + bi * p.v_sb + kvh * p.v_sh;              // [n_k, d_v]
  const int64_t key_end = visible_key_end(p, i0, rows);
  const int n_tiles = static_cast<int>((key_end + kBlockN - 1) / kBlockN);
  const int64_t shift = causal_shift(p);
  const bool causal = p.causal != Causal::kNone;

  // Staged bias / mask tiles of key tile t into buffer t & 1 (general kernel).
  auto& stg = *reinterpret_cast<typename Tr::Staged*>(smem_raw + Tr::kStagedOffset);
  const T* bias_g = nullptr;
  const uint8_t* mask_g = nullptr;
  if constexpr (kStaged) {
    if (p.bias) bias_g = static_cast<const T*>(p.bias) + bi * p.bias_s.b + hi * p.bias_s.h + i0 * p.bias_s.q;
    if (p.mask) mask_g = p.mask + bi * p.mask_s.b + hi * p.mask_s.h + i0 * p.mask_s.q;
  }
  uint8_t* const key_mask = smem_raw + Tr::kStagedOffset;  // [2][kBlockN] (kKeyMask)
  const uint8_t* const key_mask_g = kKeyMask ? p.mask + bi * p.mask_s.b + hi * p.mask_s.h : nullptr;
  // kMaskBytes: this thread's byte of the next tile's key mask (key j + threadIdx.x), loaded by
  // load_scores and stored by store_key_mask at the end of the step.
  constexpr bool kMaskBytes = kKeyMask && key_mask_bytes<Tr>();
  [[maybe_unused]] uint32_t key_mask_byte = 0;
  auto load_scores = [&](int buf, int64_t j, int valid) {
    if constexpr (kMaskBytes) {
      static_assert(kBlockN <= kThreads, "one mask byte a thread");
      const int k = static_cast<int>(threadIdx.x);
      if (k < kBlockN) key_mask_byte = k < valid ? key_mask_g[(j + k) * p.mask_s.k] : 0u;
    } else if constexpr (kKeyMask) {
      if (threadIdx.x < kBlockN / 16) {
        const int k = 16 * threadIdx.x;
        cp_async_16(key_mask + buf * kBlockN + k, key_mask_g + j + (k < valid ? k : 0), k < valid);
      }
    }
    if constexpr (kStaged) {
      if (bias_g)
        load_score_tile<T, kBlockM, kBlockN, Tr::kBiasLd, kThreads, kChunkBytes>(stg.bias[buf], bias_g + j, p.bias_s.q,
                                                                                  rows, valid);
      if (mask_g)
        load_score_tile<uint8_t, kBlockM, kBlockN, Tr::kMaskLd, kThreads, kChunkBytes>(stg.mask[buf], mask_g + j,
                                                                                        p.mask_s.q, rows, valid);
    }
  };
  auto store_key_mask = [&](int buf) {
    if constexpr (kMaskBytes) {
      if (threadIdx.x < kBlockN) key_mask[buf * kBlockN + threadIdx.x] = static_cast<uint8_t>(key_mask_byte);
    }
  };

  load_tile_async<kBlockM, kD, kThreads>(sm.q, qg, p.q_sn, rows, d);
  TileStream<kBlockN, kD, kThreads, T> k_stream(kg, p.k_sn, d), v_stream(vg, p.v_sn, dv);
  if (n_tiles > 0) {
    k_stream.load(sm.k[0], static_cast<int>(imin(kBlockN, p.n_k)));
    v_stream.load(sm.v[0], static_cast<int>(imin(kBlockN, p.n_k)));
    load_scores(0, 0, static_cast<int>(imin(kBlockN, p.n_k)));
    store_key_mask(0);
  }
  cp_async_commit_group();

  const ScoreCtx ctx(p, bi, hi);
  Dropout drop;
  drop.init(p);
  const uint64_t bh = static_cast<uint64_t>(bi * p.h + hi);
  // The plain kernels fold the scale into the exponent (SplitSoftmax::scores: one FFMA per score
  // instead of a multiply and a subtract; launch sends the scales scale_foldable refuses to the
  // general kernel) and keep a row's maximum until it grows by kRescaleMargin; the general kernel
  // scales in its epilogue.
  SplitSoftmax softmax[kMT];
  float o[kMT][kNO][4];  // [16 rows, kDn] per m-tile of this warp
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    softmax[mt].init();
    zero_acc(o[mt]);
  }
  const int row_base = 16 * kMT * warp;  // this warp's first row within the block
  constexpr int kDc = kCols16<T, kD>;  // the tiles' width for the ldmatrix address patterns
  const auto q_addr = ldsm_a_addr<kDc>(sm.q + row_base * kD);
  // float32: o is added every kFlushK keys (sm80_tile.cuh) into this thread's elements of the
  // output, which hold the partial sum scaled to the softmax maximum m_part (per row) until the
  // end; merge_part(false) takes the partial back into o there.
  constexpr bool kF32 = sizeof(T) == 4;
  float m_part[kMT][2];
  bool parted = false;  // block-uniform: the output holds a partial sum
  auto merge_part = [&](bool keep_in_part) {
    T* const o_rows = static_cast<T*>(p.o) + bi * p.o_sb + hi * p.o_sh + (i0 + row_base + lane / 4) * p.o_sn;
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float m = softmax[mt].m[h];
        const float sc = !parted || m_part[mt][h] == -__int_as_float(0x7f800000) ? 0.f : ex2_approx(m_part[mt][h] - m);
        m_part[mt][h] = m;
        const bool row_ok = i0 + row_base + 16 * mt + lane / 4 + 8 * h < p.n_q;
        T* const orow = o_rows + (16 * mt + 8 * h) * p.o_sn;
#pragma unroll
        for (int nt = 0; nt < kNO; ++nt) {
          const int col = 8 * nt + 2 * (lane % 4);
          float* const dst = reinterpret_cast<float*>(orow + col);
          const bool ok = row_ok && col < dv;
          float2 sum = make_float2(o[mt][nt][2 * h], o[mt][nt][2 * h + 1]);
          if (ok && sc != 0.f) {
            const float2 prev = *reinterpret_cast<const float2*>(dst);
            sum.x += prev.x * sc;
            sum.y += prev.y * sc;
          }
          if (keep_in_part) {
            if (ok) *reinterpret_cast<float2*>(dst) = sum;
            sum = make_float2(0.f, 0.f);
          }
          o[mt][nt][2 * h] = sum.x;
          o[mt][nt][2 * h + 1] = sum.y;
        }
      }
    parted = parted || keep_in_part;
  };

  // Row strides of the staged bias / mask tiles (0: broadcast over the queries), and this thread's
  // fragment row lane / 4 and first column 2 (lane % 4) within a tile.
  const int bias_ld = p.bias_s.q == 0 ? 0 : Tr::kBiasLd, mask_ld = p.mask_s.q == 0 ? 0 : Tr::kMaskLd;
  const int frag_off = lane / 4, frag_col2 = 2 * (lane % 4);

  // Key tile t: kCheck (the type of its second argument) compiles the bounds / diagonal test in.
  auto key_step = [&](const int t, auto check_type) {
    constexpr bool kCheck = decltype(check_type)::value;
    const int stage = t & 1;
    if (t + 1 < n_tiles) {
      const int64_t jn = static_cast<int64_t>(t + 1) * kBlockN;
      const int valid = static_cast<int>(imin(kBlockN, p.n_k - jn));
      k_stream.load(sm.k[stage ^ 1], valid);
      v_stream.load(sm.v[stage ^ 1], valid);
      load_scores(stage ^ 1, jn, valid);
      cp_async_commit_group();
      cp_async_wait_group<1>();
    } else {
      cp_async_wait_group<0>();
    }
    __syncthreads();

    // A warp whose rows see no key of this tile through the staged mask (key padding, block-sparse
    // masks) skips it: its scores would all be -inf, which changes neither the softmax nor O.
    bool live = true;
    if constexpr (kStaged) {
      if (mask_g) live = __any_sync(0xffffffffu, staged_mask_any<kBlockN, 16 * kMT>(
                                                     stg.mask[stage], row_base, mask_ld, lane));
    }
    // kKeyMask: the score limit of the thread's column pair of n-tile nt, +inf (visible) or -inf
    // (masked): min(s, limit) also hides a NaN score of a masked key, as the reference does.
    [[maybe_unused]] float2 key_lim[kKeyMask ? kNS : 1];
    if constexpr (kKeyMask) {
      const float inf = __int_as_float(0x7f800000);
      uint32_t any = 0;
#pragma unroll
      for (int nt = 0; nt < kNS; ++nt) {
        const uint32_t m = *reinterpret_cast<const uint16_t*>(key_mask + stage * kBlockN + frag_col2 + 8 * nt);
        any |= m;
        key_lim[nt] = make_float2(m & 0xffu ? inf : -inf, m & 0xff00u ? inf : -inf);
      }
      live = __any_sync(0xffffffffu, any != 0);
    }
    if (live) {
      const auto k_addr = ldsm_b_addr<kDc>(sm.k[stage]);
      const TransB<T, kD> v_addr(sm.v[stage]);
      // S = Q K^T for this warp's rows: [16, kBlockN] per m-tile
      float s[kMT][kNS][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) zero_acc(s[mt]);
#pragma unroll
      for (int kk = 0; kk < Tr::kDn / kMmaK<T>; ++kk) {
        if (!Tr::kGuardDims || kMmaK<T> * kk < d) mma_step<T>(s, q_addr, k_addr, kk);
      }

      const int64_t j0 = static_cast<int64_t>(t) * kBlockN;
      const bool diagonal = causal && j0 + kBlockN - 1 > i0 + row_base + shift;
      const bool check = kCheck && (diagonal || j0 + kBlockN > p.n_k);
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        const int64_t row0 = i0 + row_base + 16 * mt;
        const int col_limit = clamp_int(p.n_k - j0), diag = causal ? clamp_int(row0 + shift - j0) : (1 << 30);
        if constexpr (kStaged) {
          // Tile-local row of this thread's fragment row lane / 4 (+ 8 h).
          const int r = row_base + 16 * mt + frag_off;
          const T* brow = stg.bias[stage] + r * bias_ld + frag_col2;
          const uint8_t* mrow = stg.mask[stage] + r * mask_ld + frag_col2;
          biased_tile_rt<kNS, false>(
              s[mt], ctx.scale_log2, bias_g != nullptr,
              [&](int nt, int h) { return load_pair(brow + 8 * h * bias_ld + 8 * nt); }, mask_g != nullptr,
              [&](int nt, int h) { return keep_pair(mrow + 8 * h * mask_ld + 8 * nt); }, check, 1 << 30, col_limit,
              diag);
        } else if constexpr (kGeneral) {
          if (p.bias || p.mask) {
            score_tile_log2<T, kNS, false>(ctx, s[mt], row0, j0, diagonal);
          } else {  // dropout alone
            scale_mask_tile<kNS, false>(s[mt], ctx.scale_log2, check, 1 << 30, col_limit, diag);
          }
        } else {
          scale_mask_tile<kNS, false, false>(s[mt], ctx.scale_log2, check, 1 << 30, col_limit, diag);
          if constexpr (kKeyMask) {
#pragma unroll
            for (int nt = 0; nt < kNS; ++nt) {
              s[mt][nt][0] = fminf(s[mt][nt][0], key_lim[nt].x);
              s[mt][nt][1] = fminf(s[mt][nt][1], key_lim[nt].y);
              s[mt][nt][2] = fminf(s[mt][nt][2], key_lim[nt].x);
              s[mt][nt][3] = fminf(s[mt][nt][3], key_lim[nt].y);
            }
          }
        }
        if constexpr (kGeneral) {
          softmax[mt].update(s[mt], o[mt]);
          if (drop.on) dropout_tile_rows(drop, bh, s[mt], row0, j0);
        } else {
          float alpha[2];
          softmax[mt].scores(s[mt], ctx.scale_log2, alpha);
          SplitSoftmax::rescale(o[mt], alpha);
        }
      }

      // O += P V. kDropout: P packed first, then each 16-key step's keep bits drawn and applied to
      // the packed pairs (dropout_packed_step).
      [[maybe_unused]] Frag<T> pk[kDropout ? kBlockN / 16 : 1][kMT];
      if constexpr (kDropout) {
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk)
#pragma unroll
          for (int mt = 0; mt < kMT; ++mt) acc_to_frag(pk[kk][mt], s[mt], kk);
      }
#pragma unroll
      for (int kk = 0; kk < kBlockN / kMmaK<T>; ++kk) {
        Frag<T> a[kMT];
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          if constexpr (kDropout) {
            a[mt] = pk[kk][mt];
            dropout_packed_step(drop, bh, i0 + row_base + 16 * mt, j0 + 16 * kk, a[mt].r);
          } else {
            acc_to_frag(a[mt], s[mt], kk);
          }
        }
#pragma unroll
        for (int np = 0; np < kNO / 2; ++np) {
          if (!Tr::kGuardDims || 16 * np < dv) {
            Frag<T> b;
            v_addr.load(b, kk, np);
            mma_tiles(o, a, b, np);
          }
        }
      }
    }
    if constexpr (kF32) {
      static_assert(kFlushK % kBlockN == 0, "flushes at whole key tiles");
      if ((t + 1) % (kFlushK / kBlockN) == 0 && t + 1 < n_tiles) merge_part(true);
    }
    if (t + 1 < n_tiles) store_key_mask(stage ^ 1);  // (stage ^ 1's last reader was step t - 1)
    __syncthreads();  // this stage is refilled by the next iteration's prefetch
  };
  // Key tiles [0, n_inner) need neither test for any row of the block (whole tiles below n_k and
  // below every row's diagonal); the later ones (at most the last tile, plus the diagonal's under
  // causal) take them. Two loops, since ptxas turns a uniform branch around the per-element test
  // into selects that ran on every tile (d64: ~3 instructions per score element).
  int64_t inner_end = p.n_k;
  if (causal) inner_end = imin(inner_end, i0 + shift + 1);
  const int n_inner = inner_end <= 0 ? 0 : static_cast<int>(imin(inner_end / kBlockN, n_tiles));
  int t = 0;
  for (; t < n_inner; ++t) key_step(t, std::false_type());
  for (; t < n_tiles; ++t) key_step(t, std::true_type());
  cp_async_wait_group<0>();  // nothing may be in flight at exit (no key tile: Q was still loading)
  if constexpr (kF32) merge_part(false);

  // out = O / l (times 1 / (1 - p) for dropout); lse = (m + log2 l) ln 2; empty rows: 0, +inf.
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    softmax[mt].finish();
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t i = i0 + row_base + 16 * mt + lane / 4 + 8 * h;
      if (i >= p.n_q) continue;
      const float l = softmax[mt].l[h];
      const float inv = l == 0.f ? 0.f : drop.keep_scale / l;
      T* og = static_cast<T*>(p.o) + bi * p.o_sb + hi * p.o_sh + i * p.o_sn;
#pragma unroll
      for (int nt = 0; nt < kNO; ++nt) {
        const int col = 8 * nt + 2 * (lane % 4);
        if (col < dv) store2(og + col, o[mt][nt][2 * h] * inv, o[mt][nt][2 * h + 1] * inv);
      }
      if (lane % 4 == 0) {
        float* lse = static_cast<float*>(p.lse) + bh * p.n_q + i;
        *lse = l == 0.f ? __int_as_float(0x7f800000) : (softmax[mt].m[h] + __log2f(l)) * kLn2;
      }
    }
  }
}

// kDn < kD (a native head dim: 32, 96, 160, 192) runs the plain and key-mask kernels over kDn
// columns; the general kernel (bias, mask, dropout) pads to kD, one instantiation per tile width.
template <typename T, int kD, int kDn = kD>
void launch(const FwdParams& p, cudaStream_t stream) {
  using Tr = FwdTraits<T, kD>;
  using Tn = FwdTraits<T, kD, false, kDn>;
  const int64_t blocks = p.b * p.h * ceil_div(p.n_q, Tr::kBlockM);
  if (blocks == 0) return;
  // The plain kernels take the row maximum of the raw scores (SplitSoftmax).
  const bool scale_ok = scale_foldable(p.scale);
  // kSm80FwdDropoutPlain: dropout alone or with a key mask on the plain kernels (kDropout).
  constexpr bool kDropKernels = kSm80FwdDropoutPlain && sizeof(T) == 2 && kDn == kD && kD <= 128;
  const bool drop = kDropKernels && scale_ok && p.dropout_p > 0.0 && !p.bias && (!p.mask || key_mask_ok<Tn>(p, true));
  const bool key_mask = scale_ok && key_mask_ok<Tn>(p, drop);
  const bool general = !key_mask && !drop && (p.bias || p.mask || p.dropout_p > 0.0 || !scale_ok);
  // The plain kernel of traits Tx, with kKeyMask / kDropout as the call needs.
  auto plain_kernel = [&](auto traits) {
    using Tx = decltype(traits);
    auto kernel = key_mask ? sm80_fwd_kernel<T, Tx, false, false, true> : sm80_fwd_kernel<T, Tx, false, false>;
    if constexpr (kDropKernels) {
      if (drop)
        kernel = key_mask ? sm80_fwd_kernel<T, Tx, false, false, true, true>
                          : sm80_fwd_kernel<T, Tx, false, false, false, true>;
    }
    return kernel;
  };
  if constexpr (sizeof(T) == 2 && kD <= 128) {
    // The wide key tile where two blocks (and the 1 KiB each reserves) fit an SM: H100 / H200, A100
    // (164 KiB) at d = 64 only, not sm_86 / sm_89 (100 KiB), where it would halve the warps per SM.
    // With a key mask at d = 128 only (at d = 64 that kernel spills 380 bytes), in whole 16-byte
    // chunks (key_mask_chunks: the wide kernel stages no bytes, key_mask_bytes).
    using Wide = FwdTraits<T, kD, true, kDn>;
    constexpr bool kWideKeyMask = kD == 128;
    const bool wide_ok = !key_mask || (kWideKeyMask && (key_mask_bytes<Wide>() || key_mask_chunks(p)));
    if (!general && wide_ok && 2 * (Wide::kKeyMaskSmem + 1024) <= max_smem_per_sm()) {
      auto kernel = sm80_fwd_kernel<T, Wide, false, false>;
      int64_t smem = key_mask ? Wide::kKeyMaskSmem : Wide::smem_bytes(false);
      if constexpr (kWideKeyMask) {
        kernel = plain_kernel(Wide());
      } else if constexpr (kDropKernels) {
        if (drop) kernel = sm80_fwd_kernel<T, Wide, false, false, false, true>;
      }
      allow_smem(kernel, smem);
      kernel<<<static_cast<unsigned>(blocks), Wide::kThreads, smem, stream>>>(p);
      return;
    }
  }
  const bool staged = general && scores_stageable<T, Tr>(p);
  int64_t smem = Tr::smem_bytes(staged);
  auto kernel = general ? sm80_fwd_kernel<T, Tr, true, false> : plain_kernel(Tn());
  if constexpr (Tr::kStage) {
    if (staged) kernel = sm80_fwd_kernel<T, Tr, true, true>;
    if constexpr (stage_chunks4<T>()) {
      if (staged && staged_chunk_bytes<T>(p) == 4) kernel = sm80_fwd_kernel<T, Tr, true, true, false, false, true>;
    }
  }
  if (key_mask) smem = Tn::kKeyMaskSmem;
  allow_smem(kernel, smem);
  kernel<<<static_cast<unsigned>(blocks), Tr::kThreads, smem, stream>>>(p);
}

template <typename T>
void dispatch_dim(const FwdParams& p, cudaStream_t stream) {
  const int64_t dim = p.d > p.d_v ? p.d : p.d_v;
  if constexpr (sizeof(T) == 2) {  // native head dims (16-bit): the mma loops cover kDn columns
    if (dim <= 32) return launch<T, 64, 32>(p, stream);
    if (dim <= 64) return launch<T, 64>(p, stream);
    if (dim <= 96) return launch<T, 128, 96>(p, stream);
    if (dim <= 128) return launch<T, 128>(p, stream);
    if (dim <= 160) return launch<T, 256, 160>(p, stream);
    if (dim <= 192) return launch<T, 256, 192>(p, stream);
    return launch<T, 256>(p, stream);
  } else {
    if (dim <= 64) return launch<T, 64>(p, stream);
    return launch<T, 128>(p, stream);
  }
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

}  // namespace

// 16-byte cp.async rows: dims multiples of 8, row/head/batch strides of 16-byte multiples, 16-byte
// aligned bases; float32 up to head dim 128. Everything else (odd dims, exotic strides) runs on the
// SIMT kernels.
bool sm80_fwd_supported(const FwdParams& p) {
  const bool f32 = p.dtype == Dtype::kFloat32;
  if (p.dtype != Dtype::kFloat16 && p.dtype != Dtype::kBFloat16 && !f32) return false;
  const int64_t max_d = f32 ? 128 : 256, chunk = f32 ? 4 : 8;
  if (p.d % 8 || p.d_v % 8 || p.d > max_d || p.d_v > max_d) return false;
  const int64_t strides[] = {p.q_sb, p.q_sh, p.q_sn, p.k_sb, p.k_sh, p.k_sn, p.v_sb, p.v_sh, p.v_sn};
  for (int64_t s : strides)
    if (s % chunk) return false;
  if (p.o_sb % 2 || p.o_sh % 2 || p.o_sn % 2) return false;  // stores of element pairs
  const uintptr_t pair_bytes = f32 ? 8 : 4;
  return aligned16(p.q) && aligned16(p.k) && aligned16(p.v) && (reinterpret_cast<uintptr_t>(p.o) % pair_bytes) == 0;
}

void sm80_fwd(const FwdParams& p, cudaStream_t stream) {
  if (p.dtype == Dtype::kFloat32) return dispatch_dim<float>(p, stream);
  if (p.dtype == Dtype::kFloat16) return dispatch_dim<__half>(p, stream);
  return dispatch_dim<__nv_bfloat16>(p, stream);
}

}  // namespace flash_mha::cuda
