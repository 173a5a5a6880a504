// Counter-based inverted dropout (`HashDropout` in `src/layer.rs`), bit-exact with the CPU op:
// element i is kept iff u(key, i) >= p with
//   u = (splitmix64(key ^ (i * 0xD6E8FEB86659FD93)) >> 40) / 2^24   (exact in fp32),
// and out[i] = T(f32(x[i]) * (kept ? scale : 0)) with scale = 1 / (1 - p) computed by the caller.
// u64 arithmetic wraps exactly as Rust's `wrapping_*`.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ float keep_factor(uint64_t key, uint64_t i, float p, float scale) {
    const uint64_t h = splitmix64(key ^ (i * 0xD6E8FEB86659FD93ull));
    const float u = __fmul_rn((float)(uint32_t)(h >> 40), 1.0f / 16777216.0f);
    return u >= p ? scale : 0.0f;
}

template <typename T> __device__ __forceinline__ float to_f32(T v);
template <> __device__ __forceinline__ float to_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

// 8 elements per thread and step: 16-byte loads/stores (one for 2-byte types, two for f32) when
// the input is 16-byte aligned and the chunk is whole, element-wise otherwise. Grid-stride; any
// launch shape (256 threads per CTA in practice).
template <typename T>
__device__ void hash_dropout(const T* __restrict__ x, uint64_t n, float p, float scale, uint64_t key,
                             T* __restrict__ out) {
    constexpr int WORDS = (int)(8 * sizeof(T) / 16);
    const bool vec_ok = (reinterpret_cast<uintptr_t>(x) & 15u) == 0;
    const uint64_t n_chunks = (n + 7) / 8;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t c = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; c < n_chunks; c += stride) {
        const uint64_t e0 = c * 8;
        if (vec_ok && e0 + 8 <= n) {
            union {
                uint4 u[WORDS];
                T e[8];
            } buf;
#pragma unroll
            for (int w = 0; w < WORDS; ++w) buf.u[w] = reinterpret_cast<const uint4*>(x + e0)[w];
#pragma unroll
            for (int i = 0; i < 8; ++i)
                buf.e[i] = from_f32<T>(__fmul_rn(to_f32<T>(buf.e[i]), keep_factor(key, e0 + i, p, scale)));
#pragma unroll
            for (int w = 0; w < WORDS; ++w) reinterpret_cast<uint4*>(out + e0)[w] = buf.u[w];
        } else {
            for (uint64_t i = e0; i < n && i < e0 + 8; ++i)
                out[i] = from_f32<T>(__fmul_rn(to_f32<T>(x[i]), keep_factor(key, i, p, scale)));
        }
    }
}

#define DROPOUT(SUFFIX, T)                                                                              \
    extern "C" __global__ void hash_dropout_##SUFFIX(const T* __restrict__ x, uint64_t n, float p,      \
                                                     float scale, uint64_t key, T* __restrict__ out) {  \
        hash_dropout<T>(x, n, p, scale, key, out);                                                      \
    }

DROPOUT(f32, float)
DROPOUT(bf16, __nv_bfloat16)
DROPOUT(f16, __half)

// The same dropout over consecutive segments of one buffer, each with its own key (one LoRA site
// per segment: the experts of a MoE layer). Element e of segment s (starts[s] <= e < starts[s+1])
// uses index e - starts[s] under keys[s], exactly as a separate launch on that segment would.
// With `acc` non-null the result is added to it in place: acc[e] = T(acc[e] + T(x[e]·keep)),
// the rounding of a dropout followed by an addition. 8 elements per thread and step: one
// segment search per chunk, 16-byte loads and stores when the chunk is aligned and lies in one
// segment, element-wise otherwise.
template <typename T>
__device__ __forceinline__ T seg_value(const T* x, T* acc, uint64_t e, float k) {
    const T v = from_f32<T>(__fmul_rn(to_f32<T>(x[e]), k));
    return acc ? from_f32<T>(__fadd_rn(to_f32<T>(acc[e]), to_f32<T>(v))) : v;
}

template <typename T>
__device__ void hash_dropout_seg(const T* __restrict__ x, uint64_t n, float p, float scale,
                                 const uint64_t* __restrict__ starts, const uint64_t* __restrict__ keys,
                                 uint32_t nseg, T* out, T* acc) {
    constexpr int WORDS = (int)(8 * sizeof(T) / 16);
    const bool vec_ok = (reinterpret_cast<uintptr_t>(x) & 15u) == 0 && (reinterpret_cast<uintptr_t>(out) & 15u) == 0 &&
                        (reinterpret_cast<uintptr_t>(acc) & 15u) == 0;
    const uint64_t n_chunks = (n + 7) / 8;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t c = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; c < n_chunks; c += stride) {
        const uint64_t e0 = c * 8;
        uint32_t lo = 0, hi = nseg;  // the last s with starts[s] <= e0
        while (hi - lo > 1) {
            const uint32_t mid = (lo + hi) / 2;
            if (starts[mid] <= e0) lo = mid; else hi = mid;
        }
        const uint64_t s0 = starts[lo], key = keys[lo];
        if (vec_ok && e0 + 8 <= n && e0 + 8 <= starts[lo + 1]) {
            union {
                uint4 u[WORDS];
                T e[8];
            } buf, ab;
#pragma unroll
            for (int w = 0; w < WORDS; ++w) buf.u[w] = reinterpret_cast<const uint4*>(x + e0)[w];
            if (acc) {
#pragma unroll
                for (int w = 0; w < WORDS; ++w) ab.u[w] = reinterpret_cast<const uint4*>(acc + e0)[w];
            }
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                T v = from_f32<T>(__fmul_rn(to_f32<T>(buf.e[i]), keep_factor(key, e0 + i - s0, p, scale)));
                buf.e[i] = acc ? from_f32<T>(__fadd_rn(to_f32<T>(ab.e[i]), to_f32<T>(v))) : v;
            }
#pragma unroll
            for (int w = 0; w < WORDS; ++w) reinterpret_cast<uint4*>(out + e0)[w] = buf.u[w];
        } else {
            for (uint64_t e = e0; e < n && e < e0 + 8; ++e) {
                uint32_t s = lo;
                while (s + 1 < nseg && starts[s + 1] <= e) ++s;
                out[e] = seg_value(x, acc, e, keep_factor(keys[s], e - starts[s], p, scale));
            }
        }
    }
}

#define DROPOUT_SEG(SUFFIX, T)                                                                          \
    extern "C" __global__ void hash_dropout_seg_##SUFFIX(const T* __restrict__ x, uint64_t n, float p,  \
                                                         float scale, const uint64_t* starts,            \
                                                         const uint64_t* keys, uint32_t nseg,            \
                                                         T* out, T* acc) {                               \
        hash_dropout_seg<T>(x, n, p, scale, starts, keys, nseg, out, acc);                               \
    }

DROPOUT_SEG(f32, float)
DROPOUT_SEG(bf16, __nv_bfloat16)
DROPOUT_SEG(f16, __half)
