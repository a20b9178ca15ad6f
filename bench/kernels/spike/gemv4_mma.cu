// Spike, not a product path: one token through a 4-bit layer on tensor cores, with the decode
// producing bfloat16 PAIRS (bench/kernels/NOTES.md "Runs 5-9" says why the FMA path cannot reach 3x).
//
// Layout: qvla_ros's kernel layout for 4-bit rows (kernels/layout.py): row r's K/8 words are
// contiguous, and word g holds in field i (bits 4i..4i+3) the code of feature
// (g / 32) * 256 + i * 32 + g % 32. Fields i and i+4 sit 16 bits apart, so one shift and one LOP3
// turn a word into a bfloat16x2 (1 + q_i / 16, 1 + q_{i+4} / 16): two weights for two instructions.
//
// mma.sync m16n8k16 (bf16 in, f32 accumulate): A = 16 weight rows x 16 k-slots straight from the
// decode (registers only), B = x in the same k-slot order, read from a shared-memory copy of x that
// is stored pre-paired. All 8 columns of B carry the same token, so every column of C holds the
// answer and nothing needs masking. A k-slot order is any bijection onto the features as long as A
// and B agree: the thread with lane % 4 == t supplies k-slots 2t, 2t+1 (and 2t+8, 2t+9) for both.
//
// y[r] = s_r * (16 * sum_k v x - (16 + z_r) * sum_k x), v = 1 + q / 16 (exact algebra, as in
// kernels/triton_gemv.py). One block: 16 rows, WARPS warps splitting K, reduced in shared memory.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cstdint>

__device__ __forceinline__ uint32_t decode_pair(uint32_t w, int j) {
  // fields j and j + 4 to the top 4 mantissa bits of each bfloat16 half, exponent of 1.0
  uint32_t s = (j == 0) ? (w << 3) : (w >> (4 * j - 3));
  return (s & 0x00780078u) | 0x3F803F80u;
}

__device__ __forceinline__ void mma_bf16(float* c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The products of one 16-byte vector of row g's words (a) and of row g + 8's (b): per word, fields
// (0, 4) and (1, 5) make one mma's A operand and fields (2, 6) and (3, 7) the next one's, against
// that word's four x pairs (xp[q], from shared memory or registers).
__device__ __forceinline__ void products(float* acc, const uint4& a, const uint4& b, const uint4* xp) {
  const uint32_t wa[4] = {a.x, a.y, a.z, a.w};
  const uint32_t wb[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const uint4 x = xp[q];
    mma_bf16(acc, decode_pair(wa[q], 0), decode_pair(wb[q], 0), decode_pair(wa[q], 1), decode_pair(wb[q], 1),
             x.x, x.y);
    mma_bf16(acc, decode_pair(wa[q], 2), decode_pair(wb[q], 2), decode_pair(wa[q], 3), decode_pair(wb[q], 3),
             x.z, x.w);
  }
}

__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t pack_bf16(__nv_bfloat16 lo, __nv_bfloat16 hi) {
  return (uint32_t)__bfloat16_as_ushort(lo) | ((uint32_t)__bfloat16_as_ushort(hi) << 16);
}

// x's pairs for word column c, in the order products() reads them: pair j holds features
// (c / 32) * 256 + j * 32 + c % 32 and that + 128 (fields j and j + 4); their sum is added to part.
__device__ __forceinline__ uint4 pair_column(const __nv_bfloat16* __restrict__ x, int c, float& part) {
  const int base = (c >> 5) * 256 + (c & 31);
  uint32_t p[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const __nv_bfloat16 lo = x[base + j * 32], hi = x[base + (j + 4) * 32];
    p[j] = pack_bf16(lo, hi);
    part += __bfloat162float(lo) + __bfloat162float(hi);
  }
  return make_uint4(p[0], p[1], p[2], p[3]);
}

template <int WARPS, int UNROLL>
__global__ void __launch_bounds__(WARPS * 32) gemv4_mma(const uint4* __restrict__ qw,
                                                       const __nv_bfloat16* __restrict__ x,
                                                       const float* __restrict__ scale,
                                                       const float* __restrict__ zero,
                                                       __nv_bfloat16* __restrict__ y, int K) {
  extern __shared__ uint4 xs[];  // [K / 8]: for word column c, the pairs j = 0..3 of its features
  __shared__ float red[WARPS][16];
  __shared__ float xsum_part[WARPS];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int words = K / 8, vecs = words / 4;  // per row: 32-bit words, 16-byte vectors
  const int row0 = blockIdx.x * 16;
  const uint4* ra = qw + (size_t)(row0 + g) * vecs;
  const uint4* rb = qw + (size_t)(row0 + g + 8) * vecs;
  const int steps = words / (16 * WARPS);  // this warp's steps of 16 words per row
  const int v0 = warp * steps * 4;         // its first vector

  // the first batch of weights goes out before x is staged: its latency overlaps that work
  uint4 a[UNROLL], b[UNROLL];
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    a[u] = load_stream(ra + v0 + u * 4 + t);
    b[u] = load_stream(rb + v0 + u * 4 + t);
  }
  float part = 0.f;
  for (int c = tid; c < words; c += WARPS * 32) xs[c] = pair_column(x, c, part);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
  if (lane == 0) xsum_part[warp] = part;
  __syncthreads();

  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int s = 0; s < steps; s += UNROLL) {
    uint4 ca[UNROLL], cb[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) { ca[u] = a[u]; cb[u] = b[u]; }
    if (s + UNROLL < steps) {  // next batch in flight while this one is decoded
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        a[u] = load_stream(ra + v0 + (s + UNROLL + u) * 4 + t);
        b[u] = load_stream(rb + v0 + (s + UNROLL + u) * 4 + t);
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int wc = (v0 + (s + u) * 4 + t) * 4;  // this thread's first word column
      products(acc, ca[u], cb[u], xs + wc);
    }
  }
  if (t == 0) {  // column 0 of C: row g in acc[0], row g + 8 in acc[2]
    red[warp][g] = acc[0];
    red[warp][g + 8] = acc[2];
  }
  __syncthreads();
  if (tid < 16) {
    float dot = 0.f, xsum = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) { dot += red[w][tid]; xsum += xsum_part[w]; }
    const int r = row0 + tid;
    y[r] = __float2bfloat16(scale[r] * (16.f * dot - (16.f + zero[r]) * xsum));
  }
}

// Variant "xp": x is paired once per launch by a small kernel into global memory (8 KB for K = 4096,
// it stays in L1/L2) together with sum(x), so a block starts its products without staging x; each
// thread reads its x pairs with 16-byte loads issued beside its weight loads.
__global__ void pair_x(const __nv_bfloat16* __restrict__ x, uint4* __restrict__ xp, float* __restrict__ xsum,
                       int words) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  float part = 0.f;
  if (c < words) xp[c] = pair_column(x, c, part);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
  if ((threadIdx.x & 31) == 0) atomicAdd(xsum, part);
}

template <int WARPS, int UNROLL>
__global__ void __launch_bounds__(WARPS * 32) gemv4_mma_xp(const uint4* __restrict__ qw,
                                                          const uint4* __restrict__ xp,
                                                          const float* __restrict__ xsum_in,
                                                          const float* __restrict__ scale,
                                                          const float* __restrict__ zero,
                                                          __nv_bfloat16* __restrict__ y, int K) {
  __shared__ float red[WARPS][16];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int words = K / 8, vecs = words / 4;
  const int row0 = blockIdx.x * 16;
  const uint4* ra = qw + (size_t)(row0 + g) * vecs;
  const uint4* rb = qw + (size_t)(row0 + g + 8) * vecs;
  const int steps = words / (16 * WARPS);
  const int v0 = warp * steps * 4;
  uint4 a[UNROLL], b[UNROLL], xq[UNROLL][4];
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const int v = v0 + u * 4 + t;
    a[u] = load_stream(ra + v);
    b[u] = load_stream(rb + v);
#pragma unroll
    for (int q = 0; q < 4; ++q) xq[u][q] = xp[v * 4 + q];
  }
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int s = 0; s < steps; s += UNROLL) {
    uint4 ca[UNROLL], cb[UNROLL], cx[UNROLL][4];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      ca[u] = a[u];
      cb[u] = b[u];
#pragma unroll
      for (int q = 0; q < 4; ++q) cx[u][q] = xq[u][q];
    }
    if (s + UNROLL < steps) {
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const int v = v0 + (s + UNROLL + u) * 4 + t;
        a[u] = load_stream(ra + v);
        b[u] = load_stream(rb + v);
#pragma unroll
        for (int q = 0; q < 4; ++q) xq[u][q] = xp[v * 4 + q];
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) products(acc, ca[u], cb[u], cx[u]);
  }
  if (t == 0) {
    red[warp][g] = acc[0];
    red[warp][g + 8] = acc[2];
  }
  __syncthreads();
  if (tid < 16) {
    float dot = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) dot += red[w][tid];
    const int r = row0 + tid;
    y[r] = __float2bfloat16(scale[r] * (16.f * dot - (16.f + zero[r]) * xsum_in[0]));
  }
}

extern "C" int gemv4_mma_xp_launch(const void* qw, const void* x, void* xp, void* xsum, const void* scale,
                                   const void* zero, void* y, int n, int k, int warps, int unroll, void* stream) {
  // xp: K / 8 * 16 bytes of scratch; xsum: one float of scratch (zeroed here, in the stream)
  if (n % 16 || k % (128 * warps * unroll)) return 1;
  cudaStream_t st = (cudaStream_t)stream;
  const int words = k / 8;
  cudaMemsetAsync(xsum, 0, sizeof(float), st);
  pair_x<<<(words + 255) / 256, 256, 0, st>>>((const __nv_bfloat16*)x, (uint4*)xp, (float*)xsum, words);
  const dim3 grid(n / 16);
#define QVLA_LAUNCH_XP(W, U)                                                                               \
  if (warps == W && unroll == U) {                                                                         \
    gemv4_mma_xp<W, U><<<grid, W * 32, 0, st>>>((const uint4*)qw, (const uint4*)xp, (const float*)xsum,    \
                                               (const float*)scale, (const float*)zero, (__nv_bfloat16*)y, \
                                               k);                                                         \
    return (int)cudaGetLastError();                                                                        \
  }
  QVLA_LAUNCH_XP(4, 2)
  QVLA_LAUNCH_XP(8, 2)
  QVLA_LAUNCH_XP(4, 4)
  QVLA_LAUNCH_XP(16, 1)
#undef QVLA_LAUNCH_XP
  return 2;
}

extern "C" int gemv4_mma_launch(const void* qw, const void* x, const void* scale, const void* zero, void* y,
                                int n, int k, int warps, int unroll, void* stream) {
  // n: a multiple of 16; k: a multiple of 128 * warps * unroll
  if (n % 16 || k % (128 * warps * unroll)) return 1;
  const dim3 grid(n / 16);
  const size_t smem = (size_t)(k / 8) * 16;
  cudaStream_t st = (cudaStream_t)stream;
#define QVLA_LAUNCH(W, U)                                                                                  \
  if (warps == W && unroll == U) {                                                                         \
    gemv4_mma<W, U><<<grid, W * 32, smem, st>>>((const uint4*)qw, (const __nv_bfloat16*)x,                 \
                                                (const float*)scale, (const float*)zero,                   \
                                                (__nv_bfloat16*)y, k);                                     \
    return (int)cudaGetLastError();                                                                        \
  }
  QVLA_LAUNCH(4, 2)
  QVLA_LAUNCH(4, 4)
  QVLA_LAUNCH(2, 4)
  QVLA_LAUNCH(8, 2)
  QVLA_LAUNCH(2, 8)
  QVLA_LAUNCH(8, 4)
  QVLA_LAUNCH(16, 2)
  QVLA_LAUNCH(16, 1)
#undef QVLA_LAUNCH
  return 2;
}
