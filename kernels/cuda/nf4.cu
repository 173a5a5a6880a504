// NF4 / FP4 blockwise quantization and dequantization, and the double quantization of the
// absmax values, as CUDA kernels. Bit-exact with the CPU kernels in `src/nf4.rs` and
// `src/dynamic.rs` (see there for the semantics, taken from bitsandbytes' `csrc/kernels.cu`):
//
// * absmax = max |x| per block over the fp32 magnitude bits (NaN ignored, like `fmaxf`);
// * scaled = x * (1 / max(absmax, 1e-38)) (one correctly rounded division per block, then a
//   correctly rounded multiply per element), code = bitsandbytes' NF4/FP4 comparisons
//   (`x > threshold` goes up; the thresholds come from the Rust constants as a kernel argument);
// * element 2j in the high nibble of byte j; an odd tail pads the low nibble with the code of 0;
// * dequant out[j] = T(code[nibble(j)] * absmax[j / block]) with, when double-quantized,
//   absmax[k] = map[q[k]] * nested[k / dq_block] + offset (multiply, then add: two roundings).
//
// Every multiply/add whose rounding matters is written with `__fmul_rn` / `__fadd_rn` /
// `__fsub_rn` / `__fdiv_rn` so that nvcc can neither contract it into an FMA nor use a fast
// approximation. Every kernel is grid-stride; results do not depend on the launch shape.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// 16 floats passed by value: the 4-bit code book or the decision thresholds.
struct F16x {
    float v[16];
};

// Copies a by-value table to shared memory with constant indices (a dynamically indexed kernel
// parameter would be spilled to local memory first).
__device__ __forceinline__ void stage16(float* dst, const F16x& t) {
    if (threadIdx.x == 0) {
#pragma unroll
        for (int i = 0; i < 16; ++i) dst[i] = t.v[i];
    }
}

// Rust's `1e-38f32` (a subnormal), the floor of the absmax before taking its reciprocal.
#define MIN_ABSMAX __uint_as_float(0x006ce3eeu)

// ------------------------------------------------------------------------------------------
// element conversions and 8-element loads / stores

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<double>(double v) { return __double2float_rn(v); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_f32<double>(float v) { return (double)v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

// 8 consecutive elements starting at `p` (16-byte aligned, all in range), widened to fp32.
template <typename T> __device__ __forceinline__ void load8_vec(const T* p, float v[8]) {
    constexpr int WORDS = (int)(8 * sizeof(T) / 16);
    union {
        uint4 u[WORDS];
        T e[8];
    } buf;
#pragma unroll
    for (int w = 0; w < WORDS; ++w) buf.u[w] = reinterpret_cast<const uint4*>(p)[w];
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = to_f32<T>(buf.e[i]);
}

// 8 elements from index e0 of x[0..n): vector loads when possible, zeros past the end.
template <typename T>
__device__ __forceinline__ void load8(const T* __restrict__ x, uint64_t n, uint64_t e0, bool vec_ok, float v[8]) {
    if (vec_ok && e0 + 8 <= n) {
        load8_vec<T>(x + e0, v);
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = (e0 + i < n) ? to_f32<T>(x[e0 + i]) : 0.0f;
    }
}

// 8 values converted to T (round to nearest even) as 8 * sizeof(T) / 16 16-byte words; the
// 2-byte types convert in pairs (one cvt.rn.{bf16,f16}x2.f32 per pair, same rounding).
template <typename T> struct Pack8 {
    static constexpr int WORDS = (int)(8 * sizeof(T) / 16);
    static __device__ __forceinline__ void pack(const float v[8], uint4 w[WORDS]) {
        union {
            uint4 u[WORDS];
            T e[8];
        } buf;
#pragma unroll
        for (int i = 0; i < 8; ++i) buf.e[i] = from_f32<T>(v[i]);
#pragma unroll
        for (int i = 0; i < WORDS; ++i) w[i] = buf.u[i];
    }
};
template <> struct Pack8<__nv_bfloat16> {
    static constexpr int WORDS = 1;
    static __device__ __forceinline__ void pack(const float v[8], uint4 w[1]) {
        union {
            uint4 u;
            __nv_bfloat162 h[4];
        } buf;
#pragma unroll
        for (int i = 0; i < 4; ++i) buf.h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
        w[0] = buf.u;
    }
};
template <> struct Pack8<__half> {
    static constexpr int WORDS = 1;
    static __device__ __forceinline__ void pack(const float v[8], uint4 w[1]) {
        union {
            uint4 u;
            __half2 h[4];
        } buf;
#pragma unroll
        for (int i = 0; i < 4; ++i) buf.h[i] = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
        w[0] = buf.u;
    }
};

// Writes 8 values to out[e0..e0+8) (out is a fresh allocation, so e0 * sizeof(T) is 16-byte
// aligned), clipped at n.
template <typename T>
__device__ __forceinline__ void store8(T* __restrict__ out, uint64_t n, uint64_t e0, const float v[8]) {
    if (e0 + 8 <= n) {
        uint4 w[Pack8<T>::WORDS];
        Pack8<T>::pack(v, w);
#pragma unroll
        for (int i = 0; i < Pack8<T>::WORDS; ++i) reinterpret_cast<uint4*>(out + e0)[i] = w[i];
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i)
            if (e0 + i < n) out[e0 + i] = from_f32<T>(v[i]);
    }
}

// ------------------------------------------------------------------------------------------
// 4-bit codes

// Number of the 15 ascending NF4 thresholds t with x > t (branch-free binary search; NaN -> 0).
__device__ __forceinline__ uint32_t nf4_index(const float* t, float x) {
    uint32_t c = (x > t[7]) ? 8u : 0u;
    c += (x > t[c + 3]) ? 4u : 0u;
    c += (x > t[c + 1]) ? 2u : 0u;
    c += (x > t[c]) ? 1u : 0u;
    return c;
}

// bitsandbytes' FP4: sign bit 0b1000 for x < 0, then the 3-bit pattern of the magnitude rank
// among the 7 ascending thresholds (rank -> bits [0, 1, 6, 7, 4, 5, 2, 3] packed in a word).
__device__ __forceinline__ uint32_t fp4_index(const float* t, float x) {
    const uint32_t sign = (x < 0.0f) ? 8u : 0u;
    const float a = fabsf(x);
    uint32_t r = (a > t[3]) ? 4u : 0u;
    r += (a > t[r + 1]) ? 2u : 0u;
    r += (a > t[r]) ? 1u : 0u;
    return ((0x32547610u >> (4u * r)) & 0xFu) | sign;
}

template <bool FP4> __device__ __forceinline__ uint32_t index4(const float* t, float x) {
    return FP4 ? fp4_index(t, x) : nf4_index(t, x);
}

// Fused blockwise absmax + 4-bit quantization + packing.
//
// A group of G = min(block / 8, 32) lanes of a warp owns one block; each lane handles chunks of
// 8 elements (one 16-byte load for 2-byte types). Pass 1 takes the max magnitude (integer max of
// the fp32 bits, NaN counted as 0) and reduces it over the group with shuffles; pass 2 reloads
// the chunk (an L1 hit) and writes its 4 packed bytes as one 32-bit store.
// Launch: 256 threads per CTA, any number of CTAs (grid-stride over groups of blocks).
template <typename T, bool FP4>
__device__ void quantize4(const T* __restrict__ x, uint64_t n, uint32_t bs, F16x thr,
                          uint8_t* __restrict__ packed, float* __restrict__ absmax) {
    __shared__ float s_thr[16];
    stage16(s_thr, thr);
    __syncthreads();

    const uint64_t n_blocks = (n + bs - 1) / bs;
    const uint64_t n_packed = (n + 1) / 2;
    const uint32_t chunks = bs / 8;
    const uint32_t group = chunks < 32u ? chunks : 32u;
    const uint32_t per_warp = 32u / group;
    const uint32_t lane = threadIdx.x & 31u;
    const uint32_t sub = lane & (group - 1u);
    const uint64_t warp = ((uint64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const uint64_t n_warps = ((uint64_t)gridDim.x * blockDim.x) >> 5;
    const bool vec_ok = (reinterpret_cast<uintptr_t>(x) & 15u) == 0;

    // with blocks of at most 256 elements each lane owns one chunk: load it once, keep it
    const bool single = chunks <= 32u;
    for (uint64_t base = warp * per_warp; base < n_blocks; base += n_warps * per_warp) {
        const uint64_t b = base + lane / group;
        const bool active = b < n_blocks;
        uint32_t m = 0;
        float v[8];
        if (active) {
            for (uint32_t c = sub; c < chunks; c += group) {
                load8<T>(x, n, b * bs + (uint64_t)c * 8, vec_ok, v);
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    uint32_t bits = __float_as_uint(v[i]) & 0x7FFFFFFFu;
                    bits = bits > 0x7F800000u ? 0u : bits;
                    m = m > bits ? m : bits;
                }
            }
        }
        for (uint32_t off = group / 2; off > 0; off >>= 1) {
            const uint32_t o = __shfl_xor_sync(0xFFFFFFFFu, m, off);
            m = m > o ? m : o;
        }
        if (!active) continue;
        const float am = __uint_as_float(m);
        if (sub == 0) absmax[b] = am;
        const float inv = __fdiv_rn(1.0f, fmaxf(am, MIN_ABSMAX));
        for (uint32_t c = sub; c < chunks; c += group) {
            const uint64_t e0 = b * bs + (uint64_t)c * 8;
            if (!single) load8<T>(x, n, e0, vec_ok, v);
            uint32_t word = 0;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const uint32_t hi = index4<FP4>(s_thr, __fmul_rn(v[2 * k], inv));
                const uint32_t lo = index4<FP4>(s_thr, __fmul_rn(v[2 * k + 1], inv));
                word |= ((hi << 4) | lo) << (8 * k);
            }
            const uint64_t p0 = e0 / 2;
            if (e0 + 8 <= n) {
                *reinterpret_cast<uint32_t*>(packed + p0) = word;
            } else {
#pragma unroll
                for (int k = 0; k < 4; ++k)
                    if (p0 + k < n_packed) packed[p0 + k] = (uint8_t)(word >> (8 * k));
            }
        }
    }
}

// 4-bit dequantization, 8 elements (4 packed bytes, one 32-bit load) per thread and step; the
// block's absmax is read (fp32) or rebuilt from its 8-bit code (double quantization) once per
// step. A 256-entry table of (code[hi], code[lo]) pairs in shared memory turns each byte into
// one 8-byte shared load. Launch: 256 threads per CTA (the 256-entry tables are staged in
// shared memory once per CTA), a grid of about one wave. Requires a power-of-two block size >= 8.
template <typename T, bool DQ>
__device__ void dequant4(const uint8_t* __restrict__ packed, uint64_t n, uint32_t bs_log2, F16x code,
                         const float* __restrict__ absmax, const uint8_t* __restrict__ qcodes,
                         const float* __restrict__ map, const float* __restrict__ nested, float offset,
                         uint32_t dq_bs, T* __restrict__ out) {
    __shared__ float s_code[16];
    __shared__ float2 s_pair[256];
    __shared__ float s_map[256];
    stage16(s_code, code);
    if (DQ)
        for (uint32_t i = threadIdx.x; i < 256; i += blockDim.x) s_map[i] = map[i];
    __syncthreads();
    for (uint32_t i = threadIdx.x; i < 256; i += blockDim.x) s_pair[i] = make_float2(s_code[i >> 4], s_code[i & 15u]);
    __syncthreads();

    const uint64_t n_chunks = (n + 7) / 8;
    const uint64_t n_packed = (n + 1) / 2;
    const bool aligned = (reinterpret_cast<uintptr_t>(packed) & 3u) == 0;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    // UNROLL chunks per thread and step, all loads issued before any use (memory-level
    // parallelism); chunk j of a step is `stride` after chunk j - 1, so every load and store
    // instruction stays coalesced across the warp.
    constexpr int UNROLL = 2;
    for (uint64_t c0 = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; c0 < n_chunks; c0 += UNROLL * stride) {
        uint32_t word[UNROLL];
        float am[UNROLL];
#pragma unroll
        for (int j = 0; j < UNROLL; ++j) {
            const uint64_t c = c0 + j * stride;
            word[j] = 0;
            am[j] = 0.0f;
            if (c < n_chunks) {
                const uint64_t e0 = c * 8;
                const uint64_t blk = e0 >> bs_log2;
                if (DQ) {
                    am[j] = __fadd_rn(__fmul_rn(s_map[qcodes[blk]], nested[(uint32_t)blk / dq_bs]), offset);
                } else {
                    am[j] = absmax[blk];
                }
                const uint64_t p0 = e0 / 2;
                if (aligned && e0 + 8 <= n) {
                    word[j] = *reinterpret_cast<const uint32_t*>(packed + p0);
                } else {
#pragma unroll
                    for (int k = 0; k < 4; ++k)
                        if (p0 + k < n_packed) word[j] |= (uint32_t)packed[p0 + k] << (8 * k);
                }
            }
        }
#pragma unroll
        for (int j = 0; j < UNROLL; ++j) {
            const uint64_t c = c0 + j * stride;
            if (c < n_chunks) {
                float v[8];
#pragma unroll
                for (int k = 0; k < 4; ++k) {
                    const float2 p = s_pair[(word[j] >> (8 * k)) & 0xFFu];
                    v[2 * k] = __fmul_rn(p.x, am[j]);
                    v[2 * k + 1] = __fmul_rn(p.y, am[j]);
                }
                store8<T>(out, n, c * 8, v);
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// double quantization

// absmax[k] = map[q[k]] * nested[k / dq_bs] + offset. Launch: any shape (grid-stride).
extern "C" __global__ void absmax_dequant(const uint8_t* __restrict__ q, uint32_t n,
                                          const float* __restrict__ map, const float* __restrict__ nested,
                                          float offset, uint32_t dq_bs, float* __restrict__ out) {
    const uint32_t stride = gridDim.x * blockDim.x;
    for (uint32_t k = blockIdx.x * blockDim.x + threadIdx.x; k < n; k += stride)
        out[k] = __fadd_rn(__fmul_rn(map[q[k]], nested[k / dq_bs]), offset);
}

// Stage 1 of mean(absmax): one fp64 partial sum per CTA (fixed order, so deterministic).
// Launch: 256 threads per CTA, `gridDim.x` partials.
extern "C" __global__ void sum_f32_partial(const float* __restrict__ a, uint32_t n, double* __restrict__ partial) {
    __shared__ double s[256];
    double acc = 0.0;
    const uint32_t stride = gridDim.x * blockDim.x;
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) acc = __dadd_rn(acc, (double)a[i]);
    s[threadIdx.x] = acc;
    __syncthreads();
    for (uint32_t h = blockDim.x / 2; h > 0; h >>= 1) {
        if (threadIdx.x < h) s[threadIdx.x] = __dadd_rn(s[threadIdx.x], s[threadIdx.x + h]);
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = s[0];
}

// Stage 2: out[0] = f32(sum(partial) / n), as the CPU's `mean_f32` (f64 sum, one division,
// one rounding to f32); only the summation order differs. Launch: 1 CTA of 256 threads.
extern "C" __global__ void mean_f32_final(const double* __restrict__ partial, uint32_t n_partial, uint32_t n,
                                          float* __restrict__ out) {
    __shared__ double s[256];
    double acc = 0.0;
    for (uint32_t i = threadIdx.x; i < n_partial; i += blockDim.x) acc = __dadd_rn(acc, partial[i]);
    s[threadIdx.x] = acc;
    __syncthreads();
    for (uint32_t h = blockDim.x / 2; h > 0; h >>= 1) {
        if (threadIdx.x < h) s[threadIdx.x] = __dadd_rn(s[threadIdx.x], s[threadIdx.x + h]);
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] = __double2float_rn(__ddiv_rn(s[0], (double)n));
}

// bitsandbytes' `dQuantize<0>`: binary search over the sorted 256-entry map, then the nearer
// neighbour by midpoint (`x > midpoint` goes up). Verbatim port of `quantize_8bit_value`.
__device__ __forceinline__ uint32_t quantize_8bit(const float* code, float x) {
    uint32_t pivot = 127, upper_pivot = 255, lower_pivot = 0;
    float lower = -1.0f, upper = 1.0f;
    float val = code[pivot];
    for (uint32_t i = 64; i > 0; i >>= 1) {
        if (x > val) {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
        }
        val = code[pivot];
    }
    if (upper_pivot == 255) upper = code[upper_pivot];
    if (lower_pivot == 0) lower = code[lower_pivot];
    if (x > val) {
        const float mid = __fmul_rn(__fadd_rn(upper, val), 0.5f);
        return x > mid ? upper_pivot : pivot;
    } else {
        const float mid = __fmul_rn(__fadd_rn(lower, val), 0.5f);
        return x < mid ? lower_pivot : pivot;
    }
}

// Nested (second-level) quantization of the fp32 absmax: for each nested block of dq_bs values,
// nested[nb] = max |absmax - offset| and codes[k] = quantize_8bit(map, (absmax[k] - offset) *
// (1 / max(nested[nb], 1e-38))). `offset` is read from device memory (the output of
// mean_f32_final). Launch: one 256-thread CTA per nested block (grid-stride).
extern "C" __global__ void nested_quantize(const float* __restrict__ absmax, uint32_t n_blocks,
                                           const float* __restrict__ offset_p, uint32_t dq_bs,
                                           const float* __restrict__ map, uint8_t* __restrict__ codes,
                                           float* __restrict__ nested) {
    __shared__ float s_map[256];
    __shared__ float s_warp[32];
    for (uint32_t i = threadIdx.x; i < 256; i += blockDim.x) s_map[i] = map[i];
    __syncthreads();
    const float off = offset_p[0];
    const uint32_t n_nested = (n_blocks + dq_bs - 1) / dq_bs;
    const uint32_t lane = threadIdx.x & 31u, wid = threadIdx.x >> 5;
    const uint32_t n_w = (blockDim.x + 31) / 32;
    for (uint32_t nb = blockIdx.x; nb < n_nested; nb += gridDim.x) {
        const uint32_t start = nb * dq_bs;
        const uint32_t end = min(start + dq_bs, n_blocks);
        float m = 0.0f;
        for (uint32_t k = start + threadIdx.x; k < end; k += blockDim.x)
            m = fmaxf(m, fabsf(__fsub_rn(absmax[k], off)));
        for (uint32_t o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xFFFFFFFFu, m, o));
        if (lane == 0) s_warp[wid] = m;
        __syncthreads();
        if (wid == 0) {
            m = lane < n_w ? s_warp[lane] : 0.0f;
            for (uint32_t o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xFFFFFFFFu, m, o));
            if (lane == 0) s_warp[0] = m;
        }
        __syncthreads();
        m = s_warp[0];
        if (threadIdx.x == 0) nested[nb] = m;
        const float inv = __fdiv_rn(1.0f, fmaxf(m, MIN_ABSMAX));
        for (uint32_t k = start + threadIdx.x; k < end; k += blockDim.x)
            codes[k] = (uint8_t)quantize_8bit(s_map, __fmul_rn(__fsub_rn(absmax[k], off), inv));
        __syncthreads();
    }
}

// ------------------------------------------------------------------------------------------
// entry points

#define QUANTIZE4(NAME, T, FP4)                                                                          \
    extern "C" __global__ void NAME(const T* __restrict__ x, uint64_t n, uint32_t bs, F16x thr,          \
                                    uint8_t* __restrict__ packed, float* __restrict__ absmax) {          \
        quantize4<T, FP4>(x, n, bs, thr, packed, absmax);                                                \
    }

QUANTIZE4(quantize_nf4_f32, float, false)
QUANTIZE4(quantize_nf4_bf16, __nv_bfloat16, false)
QUANTIZE4(quantize_nf4_f16, __half, false)
QUANTIZE4(quantize_nf4_f64, double, false)
QUANTIZE4(quantize_fp4_f32, float, true)
QUANTIZE4(quantize_fp4_bf16, __nv_bfloat16, true)
QUANTIZE4(quantize_fp4_f16, __half, true)
QUANTIZE4(quantize_fp4_f64, double, true)

#define DEQUANT4(NAME, T)                                                                                \
    extern "C" __global__ void NAME(const uint8_t* __restrict__ packed, uint64_t n, uint32_t bs_log2,    \
                                    F16x code, const float* __restrict__ absmax, T* __restrict__ out) {  \
        dequant4<T, false>(packed, n, bs_log2, code, absmax, nullptr, nullptr, nullptr, 0.0f, 1, out);  \
    }                                                                                                    \
    extern "C" __global__ void NAME##_dq(const uint8_t* __restrict__ packed, uint64_t n, uint32_t bs_log2, \
                                         F16x code, const uint8_t* __restrict__ qcodes,                  \
                                         const float* __restrict__ map, const float* __restrict__ nested, \
                                         float offset, uint32_t dq_bs, T* __restrict__ out) {            \
        dequant4<T, true>(packed, n, bs_log2, code, nullptr, qcodes, map, nested, offset, dq_bs, out);   \
    }

DEQUANT4(dequant4_f32, float)
DEQUANT4(dequant4_bf16, __nv_bfloat16)
DEQUANT4(dequant4_f16, __half)
DEQUANT4(dequant4_f64, double)

// Several 4-bit tensors of one shape and format in one launch (four_bit.rs, dequantize_many):
// blockIdx.y picks tensor t, whose row of `table` holds the addresses of its packed codes, its
// absmax (fp32, or the 8-bit codes when double-quantized), its map and nested absmax, and its
// offset's bits; the output is t's slice of `out` (n elements each). Each tensor is dequantized
// by the same code as dequant4 (blockIdx.x / gridDim.x stride within it), so the result equals
// the single-tensor kernel's bit for bit.
#define DEQUANT4_MANY(NAME, T)                                                                             \
    extern "C" __global__ void NAME(const uint64_t* __restrict__ table, uint64_t n, uint32_t bs_log2,        \
                                    F16x code, T* __restrict__ out) {                                        \
        const uint64_t* r = table + 5 * blockIdx.y;                                                          \
        dequant4<T, false>((const uint8_t*)r[0], n, bs_log2, code, (const float*)r[1], nullptr, nullptr,     \
                           nullptr, 0.0f, 1, out + blockIdx.y * n);                                          \
    }                                                                                                        \
    extern "C" __global__ void NAME##_dq(const uint64_t* __restrict__ table, uint64_t n, uint32_t bs_log2,   \
                                         F16x code, uint32_t dq_bs, T* __restrict__ out) {                   \
        const uint64_t* r = table + 5 * blockIdx.y;                                                          \
        dequant4<T, true>((const uint8_t*)r[0], n, bs_log2, code, nullptr, (const uint8_t*)r[1],             \
                          (const float*)r[2], (const float*)r[3], __uint_as_float((uint32_t)r[4]), dq_bs,    \
                          out + blockIdx.y * n);                                                             \
    }

DEQUANT4_MANY(dequant4_many_f32, float)
DEQUANT4_MANY(dequant4_many_bf16, __nv_bfloat16)
DEQUANT4_MANY(dequant4_many_f16, __half)
DEQUANT4_MANY(dequant4_many_f64, double)
