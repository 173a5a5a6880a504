// RMSNorm as DeepSeek computes it (`src/norm.rs`): r = 1/sqrt(mean(x^2) + eps) in f32,
// n = T(x r), y = T(f32(n) w). One warp per row of `h` elements.
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float ldf(const float* p, uint64_t i) { return p[i]; }
__device__ __forceinline__ float ldf(const __nv_bfloat16* p, uint64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ float rnd(float v, const float*) { return v; }
__device__ __forceinline__ float rnd(float v, const __nv_bfloat16*) { return __bfloat162float(__float2bfloat16_rn(v)); }
__device__ __forceinline__ void stf(float* p, uint64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void stf(__nv_bfloat16* p, uint64_t i, float v) { p[i] = __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

template <typename T>
__device__ float row_inv(const T* x, uint64_t base, uint32_t h, float eps, int lane) {
    float s = 0.f;
    for (uint32_t j = lane; j < h; j += 32) {
        const float v = ldf(x, base + j);
        s += v * v;
    }
    s = warp_sum(s);
    return 1.f / sqrtf(s / (float)h + eps);
}

template <typename T>
__device__ void rms_fwd(const T* x, const float* w, T* y, uint64_t rows, uint32_t h, float eps) {
    const uint64_t r = (blockIdx.x * (uint64_t)blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x & 31;
    if (r >= rows) return;
    const uint64_t base = r * h;
    const float inv = row_inv(x, base, h, eps, lane);
    for (uint32_t j = lane; j < h; j += 32) stf(y, base + j, rnd(ldf(x, base + j) * inv, y) * w[j]);
}

// dx = r dn - x r^3 / h * sum(dn x), dn = T(dy w) widened to f32.
template <typename T>
__device__ void rms_bwd(const T* x, const float* w, const T* dy, T* dx, uint64_t rows, uint32_t h, float eps) {
    const uint64_t r = (blockIdx.x * (uint64_t)blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x & 31;
    if (r >= rows) return;
    const uint64_t base = r * h;
    const float inv = row_inv(x, base, h, eps, lane);
    float d = 0.f;
    for (uint32_t j = lane; j < h; j += 32) d += rnd(ldf(dy, base + j) * w[j], dx) * ldf(x, base + j);
    d = warp_sum(d);
    const float coef = -(inv * inv * inv) * d / (float)h;
    for (uint32_t j = lane; j < h; j += 32)
        stf(dx, base + j, rnd(ldf(dy, base + j) * w[j], dx) * inv + ldf(x, base + j) * coef);
}

extern "C" __global__ void rms_fwd_f32(const float* x, const float* w, float* y, uint64_t rows, uint32_t h, float eps) {
    rms_fwd(x, w, y, rows, h, eps);
}
extern "C" __global__ void rms_fwd_bf16(const __nv_bfloat16* x, const float* w, __nv_bfloat16* y, uint64_t rows, uint32_t h,
                                        float eps) {
    rms_fwd(x, w, y, rows, h, eps);
}
extern "C" __global__ void rms_bwd_f32(const float* x, const float* w, const float* dy, float* dx, uint64_t rows, uint32_t h,
                                       float eps) {
    rms_bwd(x, w, dy, dx, rows, h, eps);
}
extern "C" __global__ void rms_bwd_bf16(const __nv_bfloat16* x, const float* w, const __nv_bfloat16* dy, __nv_bfloat16* dx,
                                        uint64_t rows, uint32_t h, float eps) {
    rms_bwd(x, w, dy, dx, rows, h, eps);
}
