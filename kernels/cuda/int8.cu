// Row-wise absmax int8 quantization and dequantization (`src/int8.rs`), bit-exact with the CPU
// kernels: q = clamp(rint(x * (127 / absmax_row)), -127, 127) (0 for NaN, 0 scale for a zero
// row) and W' = T((q * absmax_row) * (1 / 127)).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

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

// One 256-thread CTA per row (grid-stride over rows): pass 1 takes the row's max |x| (NaN
// ignored, like Rust's `f32::max`), pass 2 writes the codes (coalesced byte stores).
template <typename T>
__device__ void int8_quantize(const T* __restrict__ x, uint32_t rows, uint32_t cols,
                              uint8_t* __restrict__ q, float* __restrict__ scale) {
    __shared__ float s_warp[32];
    const uint32_t lane = threadIdx.x & 31u, wid = threadIdx.x >> 5;
    const uint32_t n_w = (blockDim.x + 31) / 32;
    for (uint32_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* xr = x + (uint64_t)r * cols;
        uint8_t* qr = q + (uint64_t)r * cols;
        float m = 0.0f;
        for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, fabsf(to_f32<T>(xr[c])));
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
        if (threadIdx.x == 0) scale[r] = m;
        const float f = m > 0.0f ? __fdiv_rn(127.0f, m) : 0.0f;
        for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x) {
            const float v = rintf(__fmul_rn(to_f32<T>(xr[c]), f));
            int8_t code = 0;
            if (v == v) code = (int8_t)fminf(fmaxf(v, -127.0f), 127.0f);
            qr[c] = (uint8_t)code;
        }
        __syncthreads();
    }
}

// W'[r, c] = T((q[r, c] * scale[r]) * inv127), 4 codes (one 32-bit load when aligned) per thread
// and step; rows on the y axis, columns on x, both grid-stride.
template <typename T>
__device__ void int8_dequant(const uint8_t* __restrict__ q, uint32_t rows, uint32_t cols,
                             const float* __restrict__ scale, float inv127, T* __restrict__ out) {
    const uint32_t groups = (cols + 3) / 4;
    const bool aligned = ((reinterpret_cast<uintptr_t>(q) & 3u) == 0) && (cols % 4 == 0);
    for (uint32_t r = blockIdx.y; r < rows; r += gridDim.y) {
        const float s = scale[r];
        const uint8_t* qr = q + (uint64_t)r * cols;
        T* orow = out + (uint64_t)r * cols;
        for (uint32_t g = blockIdx.x * blockDim.x + threadIdx.x; g < groups; g += gridDim.x * blockDim.x) {
            const uint32_t c0 = g * 4;
            uint32_t word = 0;
            if (aligned) {
                word = *reinterpret_cast<const uint32_t*>(qr + c0);
            } else {
#pragma unroll
                for (int k = 0; k < 4; ++k)
                    if (c0 + k < cols) word |= (uint32_t)qr[c0 + k] << (8 * k);
            }
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                if (c0 + k < cols) {
                    const float code = (float)(int8_t)(uint8_t)(word >> (8 * k));
                    orow[c0 + k] = from_f32<T>(__fmul_rn(__fmul_rn(code, s), inv127));
                }
            }
        }
    }
}

#define INT8_KERNELS(SUFFIX, T)                                                                         \
    extern "C" __global__ void int8_quantize_##SUFFIX(const T* __restrict__ x, uint32_t rows, uint32_t cols, \
                                                      uint8_t* __restrict__ q, float* __restrict__ scale) { \
        int8_quantize<T>(x, rows, cols, q, scale);                                                      \
    }                                                                                                   \
    extern "C" __global__ void int8_dequant_##SUFFIX(const uint8_t* __restrict__ q, uint32_t rows,        \
                                                     uint32_t cols, const float* __restrict__ scale,     \
                                                     float inv127, T* __restrict__ out) {                \
        int8_dequant<T>(q, rows, cols, scale, inv127, out);                                             \
    }

INT8_KERNELS(f32, float)
INT8_KERNELS(bf16, __nv_bfloat16)
INT8_KERNELS(f16, __half)
INT8_KERNELS(f64, double)
