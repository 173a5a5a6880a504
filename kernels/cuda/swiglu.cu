// SwiGLU of the MLP (`src/swiglu.rs`): a = T(T(silu(g)) u) and its backward
// du = T(da T(silu(g))), dg = T(T(da u) silu'(g)), element-wise in f32.
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float ldf(const float* p, uint64_t i) { return p[i]; }
__device__ __forceinline__ float ldf(const __nv_bfloat16* p, uint64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ float rnd(float v, const float*) { return v; }
__device__ __forceinline__ float rnd(float v, const __nv_bfloat16*) { return __bfloat162float(__float2bfloat16_rn(v)); }
__device__ __forceinline__ void stf(float* p, uint64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void stf(__nv_bfloat16* p, uint64_t i, float v) { p[i] = __float2bfloat16_rn(v); }

template <typename T>
__device__ void swiglu(const T* g, const T* u, T* a, uint64_t n) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
        const float x = ldf(g, i);
        const float h = rnd(x / (1.f + expf(-x)), a);
        stf(a, i, h * ldf(u, i));
    }
}

// out[0..n) = dg, out[n..2n) = du.
template <typename T>
__device__ void swiglu_bwd(const T* g, const T* u, const T* da, T* out, uint64_t n) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
        const float x = ldf(g, i), d = ldf(da, i);
        const float s = 1.f / (1.f + expf(-x));
        const float h = rnd(x * s, out);
        stf(out, n + i, d * h);
        stf(out, i, rnd(d * ldf(u, i), out) * (s * (1.f + x * (1.f - s))));
    }
}

extern "C" __global__ void swiglu_f32(const float* g, const float* u, float* a, uint64_t n) { swiglu(g, u, a, n); }
extern "C" __global__ void swiglu_bf16(const __nv_bfloat16* g, const __nv_bfloat16* u, __nv_bfloat16* a, uint64_t n) {
    swiglu(g, u, a, n);
}
extern "C" __global__ void swiglu_bwd_f32(const float* g, const float* u, const float* da, float* out, uint64_t n) {
    swiglu_bwd(g, u, da, out, n);
}
extern "C" __global__ void swiglu_bwd_bf16(const __nv_bfloat16* g, const __nv_bfloat16* u, const __nv_bfloat16* da,
                                           __nv_bfloat16* out, uint64_t n) {
    swiglu_bwd(g, u, da, out, n);
}
