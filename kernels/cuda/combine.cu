// The MoE combine and its backward (`src/combine.rs`): expert outputs `ys` (rows grouped by
// expert, f32/bf16/f16) weighted by the f32 gate weights and summed per token in f32, without
// the token-ordered f32 copy of `ys` that a batched product needs. The sums run over j in
// order with fused multiply-adds, as the CPU twin's `mul_add`; the weight gradient's dot
// products as 32 strided partial sums folded by a warp's xor-shuffle, which the CPU twin
// repeats: all three are bit-identical to it. A row index >= n·k (out of range) reads as a
// zero row instead of out of bounds (the CPU twin refuses it).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float ld(const float* p, uint64_t i) { return p[i]; }
__device__ __forceinline__ float ld(const __nv_bfloat16* p, uint64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ float ld(const __half* p, uint64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ void st(float* p, uint64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(__nv_bfloat16* p, uint64_t i, float v) { p[i] = __float2bfloat16_rn(v); }
__device__ __forceinline__ void st(__half* p, uint64_t i, float v) { p[i] = __float2half_rn(v); }

// y[t, c] = Σ_j w[t·k + j] · ys[inv[t·k + j], c]; a block per token (grid-stride).
template <typename T>
__device__ void combine_fwd(const T* ys, const float* w, const uint32_t* inv, T* y, uint64_t n, uint32_t k, uint32_t h) {
    for (uint64_t t = blockIdx.x; t < n; t += gridDim.x) {
        for (uint32_t c = threadIdx.x; c < h; c += blockDim.x) {
            float acc = 0.f;
            for (uint32_t j = 0; j < k; j++) {
                const uint64_t o = t * k + j;
                if (inv[o] < n * k) acc = __fmaf_rn(w[o], ld(ys, (uint64_t)inv[o] * h + c), acc);
            }
            st(y, t * h + c, acc);
        }
    }
}

// dys[p, c] = w[o] · g[o / k, c] with o = order[p]; a block per row (grid-stride).
template <typename T>
__device__ void combine_bwd_rows(const T* g, const float* w, const uint32_t* order, T* dys, uint64_t rows, uint32_t k, uint32_t h) {
    for (uint64_t p = blockIdx.x; p < rows; p += gridDim.x) {
        const uint64_t o = order[p];
        if (o >= rows) {
            for (uint32_t c = threadIdx.x; c < h; c += blockDim.x) st(dys, p * h + c, 0.f);
            continue;
        }
        const float wo = w[o];
        const T* gr = g + (o / k) * h;
        for (uint32_t c = threadIdx.x; c < h; c += blockDim.x) st(dys, p * h + c, __fmul_rn(wo, ld(gr, c)));
    }
}

// dw[o] = Σ_c g[o / k, c] · ys[inv[o], c]; a warp per (token, slot) o.
template <typename T>
__device__ void combine_bwd_weights(const T* g, const T* ys, const uint32_t* inv, float* dw, uint64_t nk, uint32_t k, uint32_t h) {
    const uint32_t lane = threadIdx.x & 31;
    const uint64_t warps = (uint64_t)gridDim.x * (blockDim.x / 32);
    for (uint64_t o = (blockIdx.x * (uint64_t)blockDim.x + threadIdx.x) / 32; o < nk; o += warps) {
        const T* gr = g + (o / k) * h;
        const bool in_range = inv[o] < nk;
        const T* yr = ys + (in_range ? (uint64_t)inv[o] * h : 0);
        float acc = 0.f;
        if (in_range)
            for (uint32_t c = lane; c < h; c += 32) acc = __fmaf_rn(ld(gr, c), ld(yr, c), acc);
        for (int s = 16; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, s);
        if (lane == 0) dw[o] = acc;
    }
}

#define COMBINE(SUF, T)                                                                                          \
    extern "C" __global__ void combine_fwd_##SUF(const T* ys, const float* w, const uint32_t* inv, T* y,          \
                                                 uint64_t n, uint32_t k, uint32_t h) {                            \
        combine_fwd(ys, w, inv, y, n, k, h);                                                                     \
    }                                                                                                            \
    extern "C" __global__ void combine_bwd_rows_##SUF(const T* g, const float* w, const uint32_t* order, T* dys, \
                                                      uint64_t rows, uint32_t k, uint32_t h) {                   \
        combine_bwd_rows(g, w, order, dys, rows, k, h);                                                          \
    }                                                                                                            \
    extern "C" __global__ void combine_bwd_weights_##SUF(const T* g, const T* ys, const uint32_t* inv, float* dw,\
                                                         uint64_t nk, uint32_t k, uint32_t h) {                  \
        combine_bwd_weights(g, ys, inv, dw, nk, k, h);                                                           \
    }
COMBINE(f32, float)
COMBINE(bf16, __nv_bfloat16)
COMBINE(f16, __half)
