// The optimizer kernels of moe-peft-lora. AdamW (torch.optim.AdamW, single-tensor algorithm)
// as three in-place elementwise kernels per variable (first moment, second moment, parameter)
// and as one launch over every variable (adam_multi, from the flat gradient buffer); every
// product and sum is rounded on its own (__fmul_rn/__fadd_rn: no FMA contraction), in the
// order of the CPU loops in optim.rs, so CPU and CUDA updates are bit-identical. Moments may be
// f32 or bf16 (rounded to nearest even). Also: the flat gradient buffer's add and sum of
// squares (flat.rs) and the batched adapter casts (cast.rs).
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

// ---- Flat gradient buffer (flat.rs) ----

// dst[i] += src[i], summed in f32 and rounded to dst's type.
template <typename D, typename S>
__device__ void flat_add(D* dst, const S* src, uint64_t n) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
        st(dst, i, __fadd_rn(ld(dst, i), ld(src, i)));
    }
}
extern "C" __global__ void flat_add_f32_f32(float* d, const float* s, uint64_t n) { flat_add(d, s, n); }
extern "C" __global__ void flat_add_f32_bf16(float* d, const __nv_bfloat16* s, uint64_t n) { flat_add(d, s, n); }
extern "C" __global__ void flat_add_bf16_f32(__nv_bfloat16* d, const float* s, uint64_t n) { flat_add(d, s, n); }
extern "C" __global__ void flat_add_bf16_bf16(__nv_bfloat16* d, const __nv_bfloat16* s, uint64_t n) { flat_add(d, s, n); }

// The same for `gridDim.y` variables of n elements each: dst[offs[y] + i] += src[y·n + i]
// (one launch for a layer's stacked expert gradients).
template <typename D, typename S>
__device__ void flat_add_many(D* dst, const S* src, const uint64_t* offs, uint64_t n) {
    flat_add(dst + offs[blockIdx.y], src + blockIdx.y * n, n);
}
extern "C" __global__ void flat_add_many_f32_f32(float* d, const float* s, const uint64_t* o, uint64_t n) { flat_add_many(d, s, o, n); }
extern "C" __global__ void flat_add_many_f32_bf16(float* d, const __nv_bfloat16* s, const uint64_t* o, uint64_t n) { flat_add_many(d, s, o, n); }
extern "C" __global__ void flat_add_many_bf16_f32(__nv_bfloat16* d, const float* s, const uint64_t* o, uint64_t n) { flat_add_many(d, s, o, n); }
extern "C" __global__ void flat_add_many_bf16_bf16(__nv_bfloat16* d, const __nv_bfloat16* s, const uint64_t* o, uint64_t n) { flat_add_many(d, s, o, n); }

// out[blockIdx.x] = Σ x² over a grid-stride share of x, in f64 (blockDim.x = 256).
template <typename T>
__device__ void sum_squares(const T* x, uint64_t n, double* out) {
    double acc = 0.0;
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
        double v = (double)ld(x, i);
        acc += v * v;
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
    __shared__ double warp[8];
    if ((threadIdx.x & 31) == 0) warp[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        double s = 0.0;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) s += warp[w];
        out[blockIdx.x] = s;
    }
}
extern "C" __global__ void sum_squares_f32(const float* x, uint64_t n, double* out) { sum_squares(x, n, out); }
extern "C" __global__ void sum_squares_bf16(const __nv_bfloat16* x, uint64_t n, double* out) { sum_squares(x, n, out); }

// ---- AdamW over every variable in one launch (optim.rs, step_flat) ----
// blockIdx.x picks the variable: its f32 parameter at params[t], its moments and gradient at
// offsets[t] of the flat buffers, lens[t] elements; blockIdx.y/gridDim.y split it. Per element
// the same rounded operations as adam_moment (twice) then adam_param, the moments read back
// after rounding to their storage type, so the result equals the three-kernel path bit for bit.
__device__ __forceinline__ float rnd(float x, const float*) { return x; }
__device__ __forceinline__ float rnd(float x, const __nv_bfloat16*) { return __bfloat162float(__float2bfloat16_rn(x)); }

template <typename M, typename G>
__device__ void adam_multi(const uint64_t* params, const uint64_t* offsets, const uint64_t* lens,
                           M* m, M* v, const G* g, float b1, float omb1, float b2, float omb2,
                           float clip, float decay, int use_decay, float bc2_sqrt, float eps, float step_size) {
    const uint64_t t = blockIdx.x;
    float* p = (float*)params[t];
    const uint64_t off = offsets[t], n = lens[t];
    for (uint64_t i = blockIdx.y * (uint64_t)blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.y * blockDim.x) {
        const uint64_t j = off + i;
        float gi = __fmul_rn(ld(g, j), clip);
        float mi = rnd(__fadd_rn(__fmul_rn(ld(m, j), b1), __fmul_rn(gi, omb1)), m);
        float g2 = __fmul_rn(gi, gi);
        float vi = rnd(__fadd_rn(__fmul_rn(ld(v, j), b2), __fmul_rn(g2, omb2)), v);
        st(m, j, mi);
        st(v, j, vi);
        float pi = p[i];
        if (use_decay) pi = __fmul_rn(pi, decay);
        float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt), eps);
        p[i] = __fsub_rn(pi, __fmul_rn(__fdiv_rn(mi, denom), step_size));
    }
}

#define ADAM_MULTI(NAME, M, G)                                                                         \
    extern "C" __global__ void NAME(const uint64_t* params, const uint64_t* offsets, const uint64_t* lens, \
                                    M* m, M* v, const G* g, float b1, float omb1, float b2, float omb2,   \
                                    float clip, float decay, int use_decay, float bc2_sqrt, float eps,    \
                                    float step_size) {                                                    \
        adam_multi(params, offsets, lens, m, v, g, b1, omb1, b2, omb2, clip, decay, use_decay, bc2_sqrt, \
                   eps, step_size);                                                                       \
    }
ADAM_MULTI(adam_multi_f32_f32, float, float)
ADAM_MULTI(adam_multi_f32_bf16, float, __nv_bfloat16)
ADAM_MULTI(adam_multi_bf16_f32, __nv_bfloat16, float)
ADAM_MULTI(adam_multi_bf16_bf16, __nv_bfloat16, __nv_bfloat16)

// ---- Adapter casts (cast.rs): many f32 tensors to one bf16 buffer in one launch ----
// blockIdx.x picks the tensor (f32 at src[t], lens[t] elements, written at offsets[t] of dst);
// round to nearest even, as candle's f32 -> bf16 cast.
extern "C" __global__ void cast_multi_f32_bf16(const uint64_t* src, const uint64_t* offsets, const uint64_t* lens,
                                               __nv_bfloat16* dst) {
    const uint64_t t = blockIdx.x;
    const float* s = (const float*)src[t];
    __nv_bfloat16* d = dst + offsets[t];
    const uint64_t n = lens[t];
    for (uint64_t i = blockIdx.y * (uint64_t)blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.y * blockDim.x)
        d[i] = __float2bfloat16_rn(s[i]);
}
