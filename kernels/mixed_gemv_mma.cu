// The mixed-bit layer for 1-16 tokens on tensor cores, with the decode producing 16-bit PAIRS.
//
// Why CUDA C++ beside the Triton kernels: at few tokens the layer is a stream of packed weights, and
// what limits a kernel is the instructions it spends per weight. Triton's small-M kernel decodes
// each weight to a float32 and multiplies with FMAs (4-5 instructions per weight, 1.46-1.63x bf16 on
// the H200), and Triton cannot hand a register holding two decoded weights to the tensor cores. Here
// one shift and one LOP3 turn two fields of a word into a bfloat16x2 (or float16x2) that is an
// mma.sync operand as it stands (bench/kernels/NOTES.md, "Spike": 2.34-2.38x bf16 on 4-bit rows).
//
// Layout read (kernels/layout.py, the Triton kernels' own): row r of a b-bit group holds nkb * 32
// words; word c holds in field i the code of feature (c / 32) * KB + i * 32 + c % 32, KB = 32 * E
// features per K-block, E fields per word (8-bit: 4, 4-bit: 8, 2- and 3-bit: 16; 3-bit rows are a
// 2-bit low plane plus a high bit per feature in 16-bit half-words, bit i <-> field i of word c).
// Dense 16-bit rows are a bfloat16 [R16, K] matrix; pruned channels get the bias (or 0).
//
// Pairs: fields i and i + E/2 of a word sit 16 bits apart, so after one shift they are the two
// halves of a 16-bit pair, and a mask-and-OR with the bits of 1.0 makes v = 1 + q / 2^b in each half
// (exact: b <= 4 code bits go to the top of the mantissa). 8-bit codes do not fit bfloat16's 7
// mantissa bits, so each 8-bit pair is decoded twice, as nibbles: lo -> 1 + lo/16, hi -> 16 + hi (the
// bits of 16.0), both multiplied by the same x pair; then sum(q x) = 16 * sum over both - 272 sum(x).
// 3-bit pairs: the low plane's 2 bits as above, the high plane's bit spread to 16-bit halves (PRMT).
// Per row, y = s * (C * sum(v x) - (OFF + z) * sum(x)) with C = OFF = 2^b (8-bit: C 16, OFF 272).
//
// mma.sync m16n8k16 (16-bit in, float32 accumulate): A = 16 weight rows x 16 k-slots from the
// decode, B = 16 k-slots x 8 tokens (two products per A for 9-16 tokens). The k-slots can be any
// bijection onto features as long as A and B agree: lane (g, t) (g = lane / 4, t = lane % 4) supplies
// A's k-slots 2t, 2t+1, 2t+8, 2t+9 for rows g and g + 8 from its own word column, and B's for token
// g from the same column, so x is staged in shared memory already paired in each width's order
// (16-byte loads of x; in chunks of whole steps when 16 tokens x 11008 features would not fit).
//
// Work split: a block owns a tile of RT x 16 packed rows of ONE width (RT warps' worth of rows) and
// WK warps per 16 rows split its words; the step of a warp is 16 word columns of its 16 rows (one
// 16-byte vector per row per lane), UNROLL steps loaded ahead of the ones being multiplied. Every
// step is 64 bytes of each row whatever the width, so rows are also split along K over blocks of
// about the same number of steps (a dense row tile streams 4x a 4-bit one's bytes and would be the
// launch's critical path); the last split of a row tile to arrive adds the parts in split order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

// The tiles compiled in: (row tiles of 16 per block, warps per 16 rows along K, steps in flight).
// Blocks of 4 warps (1, 4, 2 and 2, 2, 2) and of 16 warps spilled registers at 9-16 tokens under the
// default register cap (sm_90); not tried again since __launch_bounds__ lifted it.
#define QVLA_MMA_TILES \
  QVLA_TILE(1, 8, 2)   \
  QVLA_TILE(2, 4, 2)   \
  QVLA_TILE(4, 2, 2)   \
  QVLA_TILE(1, 8, 1)   \
  QVLA_TILE(8, 1, 2)   \
  QVLA_TILE(8, 1, 4)   \
  QVLA_TILE(4, 2, 1)

namespace {

// Mirrored field for field by kernels/cuda_gemv.py (_Params): keep order and types in step.
struct Params {
  const uint32_t* qwords;      // every quantized group's words (the 3-bit high plane included)
  const uint16_t* w16;         // dense rows, bfloat16 [rows[0], K]
  const float* scale;          // per packed row
  const float* zero;           // per packed row
  const int32_t* out_index;    // output channel of each packed row, then the pruned channels
  const float* bias;           // [N] or null
  const void* x;               // [M, K] bfloat16 or float16, rows stride_x apart
  void* y;                     // [M, N] x's type or float32 (out_fp32), rows stride_y apart
  long long word_offset[5];    // first word of each slot's group (slots 1-4; 32-bit words)
  long long high_offset;       // first half-word of the 3-bit high plane
  int rows[6];                 // rows per slot: 16, 8, 4, 3, 2 bits, pruned
  int start[6];                // first packed row of each slot
  int first_tile[7];           // prefix sums of the row tiles per slot (RT * 16 rows each)
  int first_block[7];          // prefix sums of the blocks per slot (row tiles x splits)
  int nkb[5];                  // K-blocks per row (slots 1-4)
  int chunk_steps[5];          // steps staged per chunk, per slot (an even multiple of WK * UNROLL)
  int split_steps[5];          // steps per split along K, per slot (a multiple of chunk_steps)
  int splits[5];               // splits along K per row tile, per slot
  float* ws;                   // split parts: [block][RT * 16 rows][16 tokens] float32
  int32_t* counters;           // one per row tile; zero between launches
  int M, K, stride_x, stride_y, out_fp32;
};

template <typename T>
struct Half16;
template <>
struct Half16<__nv_bfloat16> {
  static constexpr int kMantissa = 7;
  static constexpr uint32_t kOne = 0x3F803F80u;      // 1.0 in each half
  static constexpr uint32_t kSixteen = 0x41804180u;  // 16.0 in each half
};
template <>
struct Half16<__half> {
  static constexpr int kMantissa = 10;
  static constexpr uint32_t kOne = 0x3C003C00u;
  static constexpr uint32_t kSixteen = 0x4C004C00u;
};

__device__ __forceinline__ uint32_t shift(uint32_t w, int by) { return by >= 0 ? w << by : w >> -by; }

// Bits [src, src + width) and [src + 16, src + 16 + width) of w moved to bit dst of each 16-bit half,
// all else zero (src, dst, width are constants after unrolling: one shift and one AND).
__device__ __forceinline__ uint32_t move_pair(uint32_t w, int src, int width, int dst) {
  const uint32_t m = ((1u << width) - 1u) << dst;
  return shift(w, dst - src) & (m | (m << 16));
}

template <typename T>
__device__ __forceinline__ void mma(float* c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                    uint32_t b1) {
  if constexpr (Half16<T>::kMantissa == 7) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ uint4 load_stream(const uint32_t* p) {
  // weights are read once: no L1 allocation
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ uint2 load_stream2(const uint16_t* p) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

template <int BITS>
struct Width {
  // x pairs per word column (dense: a column is one pair of neighbouring features)
  static constexpr int kPairs = BITS == 16 ? 1 : BITS == 8 ? 2 : BITS == 4 ? 4 : 8;
  // pairs per shared-memory vector (16 bytes at most) and vectors per column
  static constexpr int kVec = kPairs < 4 ? kPairs : 4;
  static constexpr int kVecs = kPairs / kVec;
};

// Features of pair p of word column c (dense: 2c and 2c + 1).
template <int BITS>
__device__ __forceinline__ void pair_features(int c, int p, int& f0, int& f1) {
  if constexpr (BITS == 16) {
    f0 = 2 * c;
    f1 = f0 + 1;
  } else {
    constexpr int E = BITS == 3 ? 16 : 32 / BITS;  // fields per word
    f0 = (c >> 5) * (32 * E) + p * 32 + (c & 31);
    f1 = f0 + (E / 2) * 32;
  }
}

template <typename T>
__device__ __forceinline__ uint16_t bits16(T v) {
  return *reinterpret_cast<const uint16_t*>(&v);
}

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  if constexpr (Half16<T>::kMantissa == 7) {
    return __bfloat162float(v);
  } else {
    return __half2float(v);
  }
}

// Shared-memory byte offset of vector v of column c (chunk-local) for one token: lanes t = 0..3 of a
// step read neighbouring vectors, so a warp's reads are free of bank conflicts (with the token
// stride of token_stride).
template <int BITS>
__device__ __forceinline__ int x_offset(int c, int v) {
  constexpr int VB = 4 * Width<BITS>::kVec;
  const int s = c >> 4, t = (c >> 2) & 3, u = c & 3;
  return (((s * 4 + u) * Width<BITS>::kVecs + v) * 4 + t) * VB;
}

// Token stride in bytes of a chunk of `steps` steps: the chunk's pairs, padded so that neighbouring
// tokens (lanes g and g + 1) fall on other banks.
template <int BITS>
__device__ __forceinline__ int token_stride(int steps) {
  const int bytes = steps * 16 * Width<BITS>::kPairs * 4;
  const int want = 16 * Width<BITS>::kVec;
  return bytes + (((want - bytes) % 128) + 128) % 128;
}

// Stage x's pairs of word columns [c0, c0 + steps * 16) for every token, in this width's order, and
// add the staged values to this warp's slot of xpart[warp][m] (features >= K are staged as zeros).
//
// An item is 8 neighbouring columns' pair q: with K a multiple of 8 its two runs of 8 features are
// two 16-byte loads (dense rows: one run holds 4 columns' pairs), else single features. The items of
// all tokens form one loop, each token's padded to whole warps: a warp's lanes then hold one token, so
// their sums meet in one shuffle reduction, and each (warp, token) slot is added to in a fixed order
// (the result never varies). One loop over all tokens, not a loop per token: with 16 tokens of a
// short chunk a per-token loop kept most threads idle and ran 16 dependent rounds of loads from L2.
template <typename T, int BITS>
__device__ __forceinline__ void stage_x(const Params& p, char* xs, float (*xpart)[16], int c0, int steps) {
  constexpr int P = Width<BITS>::kPairs;
  constexpr int RUN = BITS == 16 ? 4 : 8;  // columns per item
  const T* x = static_cast<const T*>(p.x);
  const int cols = steps * 16, ts = token_stride<BITS>(steps);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int items = (cols / RUN) * P;      // per token
  const int padded = (items + 31) & ~31;  // per token, whole warps
  const bool vec = ((p.K | p.stride_x) & 7) == 0 && (reinterpret_cast<uintptr_t>(p.x) & 15) == 0;
#pragma unroll 2
  for (int i = threadIdx.x; i < p.M * padded; i += blockDim.x) {
    const int m = i / padded, item = i - m * padded;
    float part = 0.f;
    if (item < items) {
      const T* xm = x + (size_t)m * p.stride_x;
      char* dst = xs + m * ts;
      const int q = item % P, c = (item / P) * RUN;  // chunk-local first column of the run
      int f0, f1;
      pair_features<BITS>(c0 + c, q, f0, f1);  // features of the run's first pair
      uint32_t lo[RUN];                        // the run's pairs (x[f0 + j], x[f1 + j]), dense: (x[f0 + 2j], ..)
      if (vec) {
        const uint4 a = f0 < p.K ? *reinterpret_cast<const uint4*>(xm + f0) : make_uint4(0u, 0u, 0u, 0u);
        const uint32_t av[4] = {a.x, a.y, a.z, a.w};
        if constexpr (BITS == 16) {
#pragma unroll
          for (int j = 0; j < 4; ++j) lo[j] = av[j];
        } else {
          const uint4 b = f1 < p.K ? *reinterpret_cast<const uint4*>(xm + f1) : make_uint4(0u, 0u, 0u, 0u);
          const uint32_t bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
          for (int j = 0; j < 4; ++j) {  // features 2j, 2j + 1 of each run -> columns 2j, 2j + 1
            lo[2 * j] = __byte_perm(av[j], bv[j], 0x5410);
            lo[2 * j + 1] = __byte_perm(av[j], bv[j], 0x7632);
          }
        }
      } else {
        const T zero = T(0.f);
#pragma unroll
        for (int j = 0; j < RUN; ++j) {
          int g0, g1;
          pair_features<BITS>(c0 + c + j, q, g0, g1);
          const T a = g0 < p.K ? xm[g0] : zero, b = g1 < p.K ? xm[g1] : zero;
          lo[j] = (uint32_t)bits16(a) | ((uint32_t)bits16(b) << 16);
        }
      }
#pragma unroll
      for (int j = 0; j < RUN; ++j) {
        const uint16_t h0 = lo[j] & 0xFFFFu, h1 = lo[j] >> 16;
        part += to_float(*reinterpret_cast<const T*>(&h0)) + to_float(*reinterpret_cast<const T*>(&h1));
        // pair q of column c + j: vector q / kVec, element q % kVec
        *reinterpret_cast<uint32_t*>(dst + x_offset<BITS>(c + j, q / Width<BITS>::kVec) +
                                     4 * (q % Width<BITS>::kVec)) = lo[j];
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
    if (lane == 0) xpart[warp][m] += part;
  }
}

// One step's weights of one lane: a 16-byte vector of row g's words and one of row g + 8's (dense:
// 8 bfloat16 features each), plus 4 half-words of each row's high plane for 3-bit rows.
struct StepWords {
  uint4 a, b;
  uint2 ha, hb;
};

template <int BITS>
__device__ __forceinline__ StepWords load_step(const uint32_t* ra, const uint32_t* rb, const uint16_t* ha,
                                               const uint16_t* hb, const uint16_t* da, const uint16_t* db,
                                               int col, int K, bool valid) {
  StepWords s;
  s.a = s.b = make_uint4(0u, 0u, 0u, 0u);
  s.ha = s.hb = make_uint2(0u, 0u);
  if (!valid) return s;
  if constexpr (BITS == 16) {
    const int f = 2 * col;  // 8 features from f
    if ((K & 7) == 0) {
      if (f < K) {
        s.a = load_stream(reinterpret_cast<const uint32_t*>(da + f));
        s.b = load_stream(reinterpret_cast<const uint32_t*>(db + f));
      }
    } else {  // rows not 16-byte aligned: one feature at a time
      uint16_t ea[8], eb[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        ea[i] = f + i < K ? da[f + i] : 0;
        eb[i] = f + i < K ? db[f + i] : 0;
      }
      s.a = make_uint4(ea[0] | (uint32_t)ea[1] << 16, ea[2] | (uint32_t)ea[3] << 16, ea[4] | (uint32_t)ea[5] << 16,
                       ea[6] | (uint32_t)ea[7] << 16);
      s.b = make_uint4(eb[0] | (uint32_t)eb[1] << 16, eb[2] | (uint32_t)eb[3] << 16, eb[4] | (uint32_t)eb[5] << 16,
                       eb[6] | (uint32_t)eb[7] << 16);
    }
  } else {
    s.a = load_stream(ra + col);
    s.b = load_stream(rb + col);
    if constexpr (BITS == 3) {
      s.ha = load_stream2(ha + col);
      s.hb = load_stream2(hb + col);
    }
  }
  return s;
}

// Half-word h's bits 0-7 to bits 0-7 and bits 8-15 to bits 16-23: bit i of field pair (i, i + 8)
// then sits at bits i and i + 16, like the low plane's pairs.
__device__ __forceinline__ uint32_t spread(uint32_t two_halves, int which) {
  return __byte_perm(two_halves, 0u, which ? 0x4342 : 0x4140);
}

template <typename T>
__device__ __forceinline__ uint32_t dense_pair(uint32_t w) {
  if constexpr (Half16<T>::kMantissa == 7) {
    return w;
  } else {  // float16 activations: the bfloat16 weights as float16 (exact for normal weights)
    const __nv_bfloat162 b = *reinterpret_cast<const __nv_bfloat162*>(&w);
    const __half2 h = __float22half2_rn(__bfloat1622float2(b));
    return *reinterpret_cast<const uint32_t*>(&h);
  }
}

// The products of one step: 4 word columns (dense: 4 pairs) of rows g and g + 8 against the staged
// x of this lane's tokens (xt[tt]: token tile tt's base for this lane).
template <typename T, int BITS, int MT>
__device__ __forceinline__ void step_products(float (&acc)[MT][4], const StepWords& s, const char* const (&xt)[MT],
                                              int cl) {
  constexpr int MB = Half16<T>::kMantissa;
  constexpr uint32_t ONE = Half16<T>::kOne;
  const uint32_t wa[4] = {s.a.x, s.a.y, s.a.z, s.a.w};
  const uint32_t wb[4] = {s.b.x, s.b.y, s.b.z, s.b.w};
  if constexpr (BITS == 16) {
    uint32_t xp[MT][4];
#pragma unroll
    for (int tt = 0; tt < MT; ++tt)
#pragma unroll
      for (int u = 0; u < 4; ++u) xp[tt][u] = *reinterpret_cast<const uint32_t*>(xt[tt] + x_offset<16>(cl + u, 0));
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t a0 = dense_pair<T>(wa[2 * h]), a1 = dense_pair<T>(wb[2 * h]);
      const uint32_t a2 = dense_pair<T>(wa[2 * h + 1]), a3 = dense_pair<T>(wb[2 * h + 1]);
#pragma unroll
      for (int tt = 0; tt < MT; ++tt) mma<T>(acc[tt], a0, a1, a2, a3, xp[tt][2 * h], xp[tt][2 * h + 1]);
    }
  } else {
    constexpr int P = Width<BITS>::kPairs;
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      uint32_t xp[MT][P];
#pragma unroll
      for (int tt = 0; tt < MT; ++tt) {
#pragma unroll
        for (int v = 0; v < Width<BITS>::kVecs; ++v) {
          const char* at = xt[tt] + x_offset<BITS>(cl + u, v);
          if constexpr (Width<BITS>::kVec == 4) {
            const uint4 q = *reinterpret_cast<const uint4*>(at);
            xp[tt][4 * v] = q.x;
            xp[tt][4 * v + 1] = q.y;
            xp[tt][4 * v + 2] = q.z;
            xp[tt][4 * v + 3] = q.w;
          } else {
            const uint2 q = *reinterpret_cast<const uint2*>(at);
            xp[tt][2 * v] = q.x;
            xp[tt][2 * v + 1] = q.y;
          }
        }
      }
      if constexpr (BITS == 8) {
        // pairs (bytes 0, 2) and (1, 3); low nibbles then high nibbles against the same x pairs
#pragma unroll
        for (int nib = 0; nib < 2; ++nib) {
          const uint32_t base = nib ? Half16<T>::kSixteen : ONE;
          const uint32_t a0 = move_pair(wa[u], 4 * nib, 4, MB - 4) | base;
          const uint32_t a1 = move_pair(wb[u], 4 * nib, 4, MB - 4) | base;
          const uint32_t a2 = move_pair(wa[u], 8 + 4 * nib, 4, MB - 4) | base;
          const uint32_t a3 = move_pair(wb[u], 8 + 4 * nib, 4, MB - 4) | base;
#pragma unroll
          for (int tt = 0; tt < MT; ++tt) mma<T>(acc[tt], a0, a1, a2, a3, xp[tt][0], xp[tt][1]);
        }
      } else {
        uint32_t hia = 0, hib = 0;
        if constexpr (BITS == 3) {
          hia = spread(u < 2 ? s.ha.x : s.ha.y, u & 1);
          hib = spread(u < 2 ? s.hb.x : s.hb.y, u & 1);
        }
#pragma unroll
        for (int q = 0; q < P; q += 2) {
          uint32_t a[4];
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            if constexpr (BITS == 3) {
              a[2 * j] = move_pair(wa[u], 2 * (q + j), 2, MB - 3) | move_pair(hia, q + j, 1, MB - 1) | ONE;
              a[2 * j + 1] = move_pair(wb[u], 2 * (q + j), 2, MB - 3) | move_pair(hib, q + j, 1, MB - 1) | ONE;
            } else {
              a[2 * j] = move_pair(wa[u], BITS * (q + j), BITS, MB - BITS) | ONE;
              a[2 * j + 1] = move_pair(wb[u], BITS * (q + j), BITS, MB - BITS) | ONE;
            }
          }
#pragma unroll
          for (int tt = 0; tt < MT; ++tt) mma<T>(acc[tt], a[0], a[1], a[2], a[3], xp[tt][q], xp[tt][q + 1]);
        }
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ void store_y(const Params& p, int m, int n, float v) {
  if (p.out_fp32) {
    static_cast<float*>(p.y)[(size_t)m * p.stride_y + n] = v;
  } else {
    static_cast<T*>(p.y)[(size_t)m * p.stride_y + n] = T(v);
  }
}

// What the epilogue of a block reads for each of its rows and tokens, staged once (see run_rows).
template <int RT>
struct Epilogue {
  float scale[RT * 16], offset[RT * 16], bias[RT * 16];
  int out[RT * 16];
  float xsum[16];  // sum(x) per token over this block's staged features
};

// y (or this split's part of it) for the RT * 16 rows of row tile `tile` of one width, over steps
// [s_lo, s_hi) of their words.
template <typename T, int BITS, int RT, int WK, int UNROLL, int MT>
__device__ __forceinline__ void run_rows(const Params& p, int slot, int tile, int split, char* xs,
                                         float (*xpart)[16], float (*red)[WK][16][16], Epilogue<RT>& ep) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int rt = warp / WK, wk = warp % WK;
  const int g = lane >> 2, t = lane & 3;
  const int rows = p.rows[slot], start = p.start[slot];
  const int row0 = tile * RT * 16 + rt * 16;  // this warp's first row in its slot
  const int rga = min(row0 + g, rows - 1), rgb = min(row0 + g + 8, rows - 1);  // past the end: any row
  int cols;                                    // word columns per row
  const uint32_t *ra = nullptr, *rb = nullptr;
  const uint16_t *ha = nullptr, *hb = nullptr, *da = nullptr, *db = nullptr;
  if constexpr (BITS == 16) {
    cols = ((p.K + 31) / 32) * 16;
    da = p.w16 + (size_t)rga * p.K;
    db = p.w16 + (size_t)rgb * p.K;
  } else {
    cols = p.nkb[slot] * 32;
    ra = p.qwords + p.word_offset[slot] + (size_t)rga * cols;
    rb = p.qwords + p.word_offset[slot] + (size_t)rgb * cols;
    if constexpr (BITS == 3) {
      const uint16_t* h = reinterpret_cast<const uint16_t*>(p.qwords) + p.high_offset;
      ha = h + (size_t)rga * cols;
      hb = h + (size_t)rgb * cols;
    }
  }
  const int chunk = p.chunk_steps[slot];
  const int s_lo = split * p.split_steps[slot];
  const int s_hi = min(s_lo + p.split_steps[slot], cols / 16);
  const int per_chunk = chunk / (WK * UNROLL);  // batches of UNROLL steps per warp per chunk
  const int batches = ((s_hi - s_lo + chunk - 1) / chunk) * per_chunk;
  const int ts = token_stride<BITS>(chunk);
  // Batch b covers steps s_lo + b * WK * UNROLL + [0, WK * UNROLL): step wk + WK * u of it is this
  // warp's u-th (the warps interleave), and chunks are whole batches, so the loop needs no division.
  constexpr int kBatch = WK * UNROLL;

  const char* xt[MT];
#pragma unroll
  for (int tt = 0; tt < MT; ++tt) xt[tt] = xs + min(g + 8 * tt, p.M - 1) * ts;

  StepWords next[UNROLL];
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const int s = s_lo + wk + WK * u;
    next[u] = load_step<BITS>(ra, rb, ha, hb, da, db, s * 16 + 4 * t, p.K, s < s_hi);
  }
  float acc[MT][4] = {};
  int chunk_start = s_lo, left = 0;  // the staged chunk's first step; its batches still to run
  for (int b = 0, base = s_lo; b < batches; ++b, base += kBatch) {
    if (left == 0) {  // a new chunk of x (the first batch's weights are already in flight)
      chunk_start = base;
      left = per_chunk;
      __syncthreads();
      stage_x<T, BITS>(p, xs, xpart, chunk_start * 16, chunk);
      __syncthreads();
    }
    --left;
    StepWords cur[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) cur[u] = next[u];
    if (b + 1 < batches) {
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const int s = base + kBatch + wk + WK * u;
        next[u] = load_step<BITS>(ra, rb, ha, hb, da, db, s * 16 + 4 * t, p.K, s < s_hi);
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int s = base + wk + WK * u;
      if (s < s_hi) step_products<T, BITS, MT>(acc, cur[u], xt, (s - chunk_start) * 16 + 4 * t);
    }
  }
  // C fragment: rows g and g + 8, token columns 2t and 2t + 1 of each token tile
#pragma unroll
  for (int tt = 0; tt < MT; ++tt) {
    red[rt][wk][g][8 * tt + 2 * t] = acc[tt][0];
    red[rt][wk][g][8 * tt + 2 * t + 1] = acc[tt][1];
    red[rt][wk][g + 8][8 * tt + 2 * t] = acc[tt][2];
    red[rt][wk][g + 8][8 * tt + 2 * t + 1] = acc[tt][3];
  }
  float C = 1.f, OFF = 0.f;
  if constexpr (BITS == 8) {
    C = 16.f;
    OFF = 272.f;
  } else if constexpr (BITS != 16) {
    C = OFF = float(1 << BITS);
  }
  // Each row's scale, offset, output channel and bias, and each token's sum(x), fetched once: the
  // (row, token) items below would otherwise wait on a load from memory each (16 tokens x 128 rows:
  // 8 dependent rounds of loads per block).
  for (int r = threadIdx.x; r < RT * 16; r += blockDim.x) {
    const int prow = start + min(tile * RT * 16 + r, rows - 1);
    const int n = p.out_index[prow];
    ep.out[r] = n;
    ep.bias[r] = p.bias ? p.bias[n] : 0.f;
    if constexpr (BITS != 16) {
      ep.scale[r] = p.scale[prow];
      ep.offset[r] = OFF + p.zero[prow];
    }
  }
  for (int m = threadIdx.x; m < p.M; m += blockDim.x) {
    float xsum = 0.f;
    for (int w = 0; w < RT * WK; ++w) xsum += xpart[w][m];
    ep.xsum[m] = xsum;
  }
  __syncthreads();
  const int splits = p.splits[slot];
  // this split's part of y for (row r, token m): the split's own sum(x) goes with its own products
  auto part = [&](int r, int m) {
    float dot = 0.f;
#pragma unroll
    for (int w = 0; w < WK; ++w) dot += red[r / 16][w][r % 16][m];
    if constexpr (BITS == 16) {
      return dot;
    } else {
      return ep.scale[r] * (C * dot - ep.offset[r] * ep.xsum[m]);
    }
  };
  auto store = [&](int r, int m, float v) { store_y<T>(p, m, ep.out[r], p.bias ? v + ep.bias[r] : v); };
  if (splits == 1) {
    for (int item = threadIdx.x; item < RT * 16 * p.M; item += blockDim.x) {
      const int m = item / (RT * 16), r = item % (RT * 16);
      if (tile * RT * 16 + r < rows) store(r, m, part(r, m));
    }
    return;
  }
  // split along K: park this part; the last split of the row tile to arrive adds the parts in split
  // order (the same result whatever the arrival order) and resets the tile's counter
  constexpr int PART = RT * 16 * 16;
  const int first = p.first_block[slot] + tile * splits;  // the tile's first block
  float* parts = p.ws + (size_t)first * PART;
  for (int item = threadIdx.x; item < RT * 16 * p.M; item += blockDim.x) {
    const int m = item / (RT * 16), r = item % (RT * 16);
    parts[(size_t)split * PART + r * 16 + m] = part(r, m);
  }
  __threadfence();
  __syncthreads();
  __shared__ int last;
  int32_t* counter = p.counters + p.first_tile[slot] + tile;
  if (threadIdx.x == 0) last = atomicAdd(counter, 1) == splits - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
#pragma unroll 4  // the items' loads of the parts in flight together, not one round trip each
  for (int item = threadIdx.x; item < RT * 16 * p.M; item += blockDim.x) {
    const int m = item / (RT * 16), r = item % (RT * 16);
    if (tile * RT * 16 + r >= rows) continue;
    float v = 0.f;
    for (int sp = 0; sp < splits; ++sp) v += __ldcg(parts + (size_t)sp * PART + r * 16 + m);
    store(r, m, v);
  }
  if (threadIdx.x == 0) *counter = 0;
}

template <typename T, int RT, int WK, int UNROLL, int MT>
__global__ void __launch_bounds__(RT* WK * 32, 1) mixed_gemv_mma(const Params p) {
  extern __shared__ __align__(16) char xs[];
  __shared__ float red[RT][WK][16][16];
  __shared__ float xpart[RT * WK][16];  // sum(x) per warp and token, over the columns it staged
  __shared__ Epilogue<RT> ep;
  const int block = blockIdx.x;
  int slot = 0;
#pragma unroll
  for (int s = 1; s < 6; ++s) slot += block >= p.first_block[s];
  const int local = block - p.first_block[slot];
  if (slot == 5) {  // pruned channels (one block per row tile): the bias, or 0
    for (int item = threadIdx.x; item < RT * 16 * p.M; item += blockDim.x) {
      const int m = item / (RT * 16), row = local * RT * 16 + item % (RT * 16);
      if (row >= p.rows[5]) continue;
      const int n = p.out_index[p.start[5] + row];
      store_y<T>(p, m, n, p.bias ? p.bias[n] : 0.f);
    }
    return;
  }
  for (int i = threadIdx.x; i < RT * WK * 16; i += blockDim.x) xpart[i / 16][i % 16] = 0.f;  // before a barrier
  const int splits = p.splits[slot], tile = local / splits, split = local % splits;
  switch (slot) {
    case 0: run_rows<T, 16, RT, WK, UNROLL, MT>(p, slot, tile, split, xs, xpart, red, ep); break;
    case 1: run_rows<T, 8, RT, WK, UNROLL, MT>(p, slot, tile, split, xs, xpart, red, ep); break;
    case 2: run_rows<T, 4, RT, WK, UNROLL, MT>(p, slot, tile, split, xs, xpart, red, ep); break;
    case 3: run_rows<T, 3, RT, WK, UNROLL, MT>(p, slot, tile, split, xs, xpart, red, ep); break;
    default: run_rows<T, 2, RT, WK, UNROLL, MT>(p, slot, tile, split, xs, xpart, red, ep); break;
  }
}

template <typename T, int RT, int WK, int UNROLL, int MT>
int launch(const Params& p, int blocks, int smem, cudaStream_t stream) {
  auto kernel = mixed_gemv_mma<T, RT, WK, UNROLL, MT>;
  static int raised = 0;  // the dynamic shared-memory limit granted so far
  if (smem > raised) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return (int)e;
    raised = smem;
  }
  kernel<<<blocks, RT * WK * 32, smem, stream>>>(p);
  return (int)cudaGetLastError();
}

template <typename T, int RT, int WK, int UNROLL>
int launch_tokens(const Params& p, int blocks, int smem, cudaStream_t stream) {
  return p.M <= 8 ? launch<T, RT, WK, UNROLL, 1>(p, blocks, smem, stream)
                  : launch<T, RT, WK, UNROLL, 2>(p, blocks, smem, stream);
}

template <typename T>
int launch_tile(const Params& p, int rt, int wk, int unroll, int blocks, int smem, cudaStream_t stream) {
#define QVLA_TILE(RT, WK, U) \
  if (rt == RT && wk == WK && unroll == U) return launch_tokens<T, RT, WK, U>(p, blocks, smem, stream);
  QVLA_MMA_TILES
#undef QVLA_TILE
  return -1;
}

}  // namespace

extern "C" int qvla_mma_tiles(int* out, int capacity) {
  // the compiled (row tiles, warps along K, unroll) triples, for the Python side to check against
  int n = 0;
#define QVLA_TILE(RT, WK, U)    \
  if (n + 3 <= capacity) {      \
    out[n] = RT;                \
    out[n + 1] = WK;            \
    out[n + 2] = U;             \
  }                             \
  n += 3;
  QVLA_MMA_TILES
#undef QVLA_TILE
  return n / 3;
}

// sizeof(Params), then the offset of each field in declaration order: the Python launcher checks its
// ctypes mirror against these (a field added on one side only would shift every field after it).
extern "C" int qvla_mma_params_layout(long long* out, int capacity) {
  const long long layout[] = {
      (long long)sizeof(Params),           (long long)offsetof(Params, qwords),
      (long long)offsetof(Params, w16),    (long long)offsetof(Params, scale),
      (long long)offsetof(Params, zero),   (long long)offsetof(Params, out_index),
      (long long)offsetof(Params, bias),   (long long)offsetof(Params, x),
      (long long)offsetof(Params, y),      (long long)offsetof(Params, word_offset),
      (long long)offsetof(Params, high_offset), (long long)offsetof(Params, rows),
      (long long)offsetof(Params, start),  (long long)offsetof(Params, first_tile),
      (long long)offsetof(Params, first_block), (long long)offsetof(Params, nkb),
      (long long)offsetof(Params, chunk_steps), (long long)offsetof(Params, split_steps),
      (long long)offsetof(Params, splits), (long long)offsetof(Params, ws),
      (long long)offsetof(Params, counters), (long long)offsetof(Params, M),
      (long long)offsetof(Params, K),      (long long)offsetof(Params, stride_x),
      (long long)offsetof(Params, stride_y), (long long)offsetof(Params, out_fp32)};
  const int n = (int)(sizeof(layout) / sizeof(layout[0]));
  for (int i = 0; i < n && i < capacity; ++i) out[i] = layout[i];
  return n;
}

// Returns 0, -1 for a tile that is not compiled in, or a cudaError_t. `params` points to a Params
// (typed void: a parameter of the unnamed namespace's type would keep the symbol from being exported).
extern "C" int qvla_mma_gemv(const void* params, int x_fp16, int rt, int wk, int unroll, int blocks, int smem,
                             void* stream) {
  const Params& p = *static_cast<const Params*>(params);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  return x_fp16 ? launch_tile<__half>(p, rt, wk, unroll, blocks, smem, st)
                : launch_tile<__nv_bfloat16>(p, rt, wk, unroll, blocks, smem, st);
}
