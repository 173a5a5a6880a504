// Cross-entropy rows of the LM head (`src/xent.rs`), in f32 from bf16/f32 logits: one block of
// 256 threads per row. Forward: loss = log Σ exp(x - max) + max - x[t]; backward: the softmax
// exp(x - max) / Σ (the caller scales and subtracts the one-hot in its GEMMs).
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float ldf(const float* p, uint64_t i) { return p[i]; }
__device__ __forceinline__ float ldf(const __nv_bfloat16* p, uint64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void stf(float* p, uint64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void stf(__nv_bfloat16* p, uint64_t i, float v) { p[i] = __float2bfloat16_rn(v); }

template <bool MAX>
__device__ float block_reduce(float v) {
    __shared__ float part[8];
    __shared__ float total;
    for (int o = 16; o > 0; o >>= 1) {
        const float w = __shfl_xor_sync(0xffffffffu, v, o);
        v = MAX ? fmaxf(v, w) : v + w;
    }
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float t = part[0];
        for (int i = 1; i < (int)(blockDim.x >> 5); ++i) t = MAX ? fmaxf(t, part[i]) : t + part[i];
        total = t;
    }
    __syncthreads();
    return total;
}

template <typename T>
__device__ void row_max_sum(const T* x, uint32_t v, float* m, float* s) {
    float mx = -INFINITY;
    for (uint32_t j = threadIdx.x; j < v; j += blockDim.x) mx = fmaxf(mx, ldf(x, j));
    mx = block_reduce<true>(mx);
    float sum = 0.f;
    for (uint32_t j = threadIdx.x; j < v; j += blockDim.x) sum += expf(ldf(x, j) - mx);
    *s = block_reduce<false>(sum);
    *m = mx;
}

template <typename T>
__device__ void xent_fwd(const T* logits, const uint32_t* t, float* loss, uint32_t v) {
    const T* x = logits + (uint64_t)blockIdx.x * v;
    float m, s;
    row_max_sum(x, v, &m, &s);
    if (threadIdx.x == 0) {
        const uint32_t ti = t[blockIdx.x];
        loss[blockIdx.x] = ti < v ? (logf(s) + m) - ldf(x, ti) : __int_as_float(0x7fc00000);
    }
}

template <typename T>
__device__ void xent_bwd(const T* logits, T* p, uint32_t v) {
    const uint64_t base = (uint64_t)blockIdx.x * v;
    float m, s;
    row_max_sum(logits + base, v, &m, &s);
    for (uint32_t j = threadIdx.x; j < v; j += blockDim.x) stf(p, base + j, expf(ldf(logits, base + j) - m) / s);
}

extern "C" __global__ void xent_fwd_f32(const float* x, const uint32_t* t, float* loss, uint32_t v) { xent_fwd(x, t, loss, v); }
extern "C" __global__ void xent_fwd_bf16(const __nv_bfloat16* x, const uint32_t* t, float* loss, uint32_t v) {
    xent_fwd(x, t, loss, v);
}
extern "C" __global__ void xent_bwd_f32(const float* x, float* p, uint32_t v) { xent_bwd(x, p, v); }
extern "C" __global__ void xent_bwd_bf16(const __nv_bfloat16* x, __nv_bfloat16* p, uint32_t v) { xent_bwd(x, p, v); }
