// AdamW (torch.optim.AdamW, single-tensor algorithm) as three in-place elementwise kernels per
// variable: first moment, second moment, parameter. Every product and sum is rounded on its
// own (__fmul_rn/__fadd_rn: no FMA contraction), in the order of the CPU loops in optim.rs, so
// CPU and CUDA updates are bit-identical. Moments may be f32 or bf16 (rounded to nearest even).
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float ld(const float* p, uint64_t i) { return p[i]; }
__device__ __forceinline__ float ld(const __nv_bfloat16* p, uint64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void st(float* p, uint64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(__nv_bfloat16* p, uint64_t i, float v) { p[i] = __float2bfloat16_rn(v); }

// m = beta * m + (1 - beta) * (g * clip)      (first moment)
// v = beta * v + (1 - beta) * (g * clip)^2    (second moment, square = 1)
template <typename M>
__device__ void moment(M* m, const float* g, uint64_t n, float beta, float one_minus, float clip, int square) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
        float gi = __fmul_rn(g[i], clip);
        if (square) gi = __fmul_rn(gi, gi);
        st(m, i, __fadd_rn(__fmul_rn(ld(m, i), beta), __fmul_rn(gi, one_minus)));
    }
}

// p = p * decay - (m / (sqrt(v) / bc2_sqrt + eps)) * step_size
template <typename M>
__device__ void param(float* p, const M* m, const M* v, uint64_t n, float decay, int use_decay,
                      float bc2_sqrt, float eps, float step_size) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
        float pi = p[i];
        if (use_decay) pi = __fmul_rn(pi, decay);
        float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(ld(v, i)), bc2_sqrt), eps);
        p[i] = __fsub_rn(pi, __fmul_rn(__fdiv_rn(ld(m, i), denom), step_size));
    }
}

extern "C" __global__ void adam_moment_f32(float* m, const float* g, uint64_t n, float beta, float one_minus, float clip, int square) {
    moment(m, g, n, beta, one_minus, clip, square);
}
extern "C" __global__ void adam_moment_bf16(__nv_bfloat16* m, const float* g, uint64_t n, float beta, float one_minus, float clip, int square) {
    moment(m, g, n, beta, one_minus, clip, square);
}
extern "C" __global__ void adam_param_f32(float* p, const float* m, const float* v, uint64_t n, float decay, int use_decay, float bc2_sqrt, float eps, float step_size) {
    param(p, m, v, n, decay, use_decay, bc2_sqrt, eps, step_size);
}
extern "C" __global__ void adam_param_bf16(float* p, const __nv_bfloat16* m, const __nv_bfloat16* v, uint64_t n, float decay, int use_decay, float bc2_sqrt, float eps, float step_size) {
    param(p, m, v, n, decay, use_decay, bc2_sqrt, eps, step_size);
}
