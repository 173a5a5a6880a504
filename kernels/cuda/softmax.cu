// Row softmax kernels for attention (`src/softmax.rs`), computed in f32 like the CPU twins.
// One warp per row of `c` elements; rows are contiguous.
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float ldf(const float* p, uint64_t i) { return p[i]; }
__device__ __forceinline__ float ldf(const __nv_bfloat16* p, uint64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void stf(float* p, uint64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void stf(__nv_bfloat16* p, uint64_t i, float v) { p[i] = __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// out[r, :] = softmax(x[r, :] + mask[mrow(r), :]) with x of shape (b, h, sq, c) flattened to rows
// r = ((bi * h) + hi) * sq + qi, and mask rows mrow = (mask_batched ? bi : 0) * sq + qi (mask of
// shape (1 or b, 1, sq, c)); no mask when `mask` is null. exp(v - max) / Σ, in f32.
template <typename T>
__device__ void masked_softmax(const T* x, const T* mask, T* out, uint64_t rows, uint32_t c, uint32_t h,
                               uint32_t sq, int mask_batched) {
    const uint64_t warp = (blockIdx.x * (uint64_t)blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x & 31;
    if (warp >= rows) return;
    const uint64_t base = warp * c;
    uint64_t mbase = 0;
    if (mask) {
        const uint64_t qi = warp % sq, bi = warp / ((uint64_t)h * sq);
        mbase = ((mask_batched ? bi : 0) * sq + qi) * c;
    }
    float m = -INFINITY;
    for (uint32_t j = lane; j < c; j += 32) {
        float v = ldf(x, base + j);
        if (mask) v += ldf(mask, mbase + j);
        m = fmaxf(m, v);
    }
    m = warp_max(m);
    float s = 0.f;
    for (uint32_t j = lane; j < c; j += 32) {
        float v = ldf(x, base + j);
        if (mask) v += ldf(mask, mbase + j);
        s += expf(v - m);
    }
    s = warp_sum(s);
    const float inv = 1.f / s;
    for (uint32_t j = lane; j < c; j += 32) {
        float v = ldf(x, base + j);
        if (mask) v += ldf(mask, mbase + j);
        stf(out, base + j, expf(v - m) * inv);
    }
}

// ds[r, :] = p[r, :] * (dp[r, :] - Σ_j dp[r, j] p[r, j]), in f32.
template <typename T>
__device__ void softmax_bwd(const T* p, const T* dp, T* ds, uint64_t rows, uint32_t c) {
    const uint64_t warp = (blockIdx.x * (uint64_t)blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x & 31;
    if (warp >= rows) return;
    const uint64_t base = warp * c;
    float d = 0.f;
    for (uint32_t j = lane; j < c; j += 32) d += ldf(dp, base + j) * ldf(p, base + j);
    d = warp_sum(d);
    for (uint32_t j = lane; j < c; j += 32) stf(ds, base + j, ldf(p, base + j) * (ldf(dp, base + j) - d));
}

extern "C" __global__ void masked_softmax_f32(const float* x, const float* mask, float* out, uint64_t rows, uint32_t c,
                                              uint32_t h, uint32_t sq, int mb) {
    masked_softmax(x, mask, out, rows, c, h, sq, mb);
}
extern "C" __global__ void masked_softmax_bf16(const __nv_bfloat16* x, const __nv_bfloat16* mask, __nv_bfloat16* out,
                                               uint64_t rows, uint32_t c, uint32_t h, uint32_t sq, int mb) {
    masked_softmax(x, mask, out, rows, c, h, sq, mb);
}
extern "C" __global__ void softmax_bwd_f32(const float* p, const float* dp, float* ds, uint64_t rows, uint32_t c) {
    softmax_bwd(p, dp, ds, rows, c);
}
extern "C" __global__ void softmax_bwd_bf16(const __nv_bfloat16* p, const __nv_bfloat16* dp, __nv_bfloat16* ds,
                                            uint64_t rows, uint32_t c) {
    softmax_bwd(p, dp, ds, rows, c);
}
