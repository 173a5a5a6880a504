// 8-bit blockwise AdamW (adam8bit.rs): every variable of the flat gradient buffer in one launch.
// blockIdx.x picks the variable (table row t: parameter address, gradient offset, length, state
// offset, block offset, 8-bit flag, bf16 flag); blockIdx.y strides over its blocks of 256 elements, one
// element per thread. The same rounded operations as the CPU twin (no FMA contraction, correctly
// rounded division and square root), so both give the same bits. bf16 parameters are stored by
// stochastic rounding with the twin's splitmix64 draw.
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float ld(const float* p, uint64_t i) { return p[i]; }
__device__ __forceinline__ float ld(const __nv_bfloat16* p, uint64_t i) { return __bfloat162float(p[i]); }

// The twin's splitmix64 (dropout.rs): golden-gamma increment, then the finalizer.
__device__ __forceinline__ uint64_t splitmix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ void store(float* p, uint64_t i, float x, uint64_t, uint64_t) { p[i] = x; }
__device__ __forceinline__ void store(__nv_bfloat16* p, uint64_t i, float x, uint64_t key, uint64_t t) {
    if (!isfinite(x)) {
        p[i] = __float2bfloat16_rn(x);
        return;
    }
    uint32_t r = (uint32_t)(splitmix64(key ^ (t << 40) ^ (i * 0xD6E8FEB86659FD93ull)) >> 48);
    uint32_t bits = (__float_as_uint(x) + (r & 0xFFFFu)) >> 16;
    p[i] = __ushort_as_bfloat16((unsigned short)bits);
}

// bitsandbytes' quantize_2D<SIGNED> on a plain sorted map.
__device__ __forceinline__ unsigned char quantize_2d(const float* map, float x, bool is_signed) {
    int pivot = 127, upper_pivot = 255, lower_pivot = 0;
    float lower = is_signed ? -1.0f : 0.0f, upper = 1.0f;
    float val = map[pivot];
    for (int i = 64; i > 0; i >>= 1) {
        if (x > val) {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
        }
        val = map[pivot];
    }
    if (x > val) {
        return __fmul_rn(__fadd_rn(upper, val), 0.5f) < x ? upper_pivot : pivot;
    }
    return x < __fmul_rn(__fadd_rn(lower, val), 0.5f) ? lower_pivot : pivot;
}

__device__ __forceinline__ float block_max(float x, float* red) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = x;
    __syncthreads();
    float m = red[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); ++w) m = fmaxf(m, red[w]);
    __syncthreads();
    return m;
}

template <typename G>
__device__ void adam8bit(const uint64_t* table, const float* maps, const G* g, unsigned char* codes1,
                         unsigned char* codes2, float* absmax1, float* absmax2, float* m32, float* v32,
                         float b1, float omb1, float b2, float omb2, float clip, float step_size, float c2eps,
                         float decay, int use_decay, uint64_t key) {
    __shared__ float smap[512];
    __shared__ float red1[8], red2[8];
    for (int k = threadIdx.x; k < 512; k += blockDim.x) smap[k] = maps[k];
    __syncthreads();
    const float* sgn = smap;
    const float* uns = smap + 256;
    const uint64_t t = blockIdx.x;
    const uint64_t* row = table + 7 * t;
    const uint64_t goff = row[1], n = row[2], so = row[3], bo = row[4];
    const bool q8 = row[5] != 0, bf = row[6] != 0;
    float* pf = (float*)row[0];
    __nv_bfloat16* pb = (__nv_bfloat16*)row[0];
    const uint64_t nb = (n + 255) / 256;
    for (uint64_t b = blockIdx.y; b < nb; b += gridDim.y) {
        const uint64_t i = b * 256 + threadIdx.x;
        const bool valid = i < n;
        float gi = 0.0f, s1 = 0.0f, s2 = 0.0f;
        if (valid) {
            gi = __fmul_rn(ld(g, goff + i), clip);
            float a, c;
            if (q8) {
                a = __fmul_rn(sgn[codes1[so + i]], absmax1[bo + b]);
                c = __fmul_rn(uns[codes2[so + i]], absmax2[bo + b]);
            } else {
                a = m32[so + i];
                c = v32[so + i];
            }
            s1 = __fadd_rn(__fmul_rn(a, b1), __fmul_rn(gi, omb1));
            s2 = __fadd_rn(__fmul_rn(c, b2), __fmul_rn(__fmul_rn(gi, gi), omb2));
        }
        float mx1 = 0.0f, mx2 = 0.0f;
        if (q8) {  // uniform over the CUDA block: the variable is the block's
            mx1 = block_max(valid ? fabsf(s1) : 0.0f, red1);
            mx2 = block_max(valid ? fabsf(s2) : 0.0f, red2);
        }
        if (!valid) continue;
        float pi = bf ? ld(pb, i) : ld(pf, i);
        pi = __fadd_rn(pi, __fmul_rn(step_size, __fdiv_rn(s1, __fadd_rn(__fsqrt_rn(s2), c2eps))));
        if (use_decay) pi = __fmul_rn(pi, decay);
        if (bf)
            store(pb, i, pi, key, t);
        else
            store(pf, i, pi, key, t);
        if (q8) {
            float x1 = mx1 > 0.0f ? __fdiv_rn(s1, mx1) : 0.0f;
            float x2 = mx2 > 0.0f ? __fdiv_rn(s2, mx2) : 0.0f;
            unsigned char q1 = quantize_2d(sgn, x1, true);
            if (signbit(sgn[q1]) != signbit(s1)) q1 = s1 > 0.0f ? (unsigned char)(q1 + 1) : (unsigned char)(q1 - 1);
            codes1[so + i] = q1;
            codes2[so + i] = quantize_2d(uns, x2, false);
            if (threadIdx.x == 0) {
                absmax1[bo + b] = mx1;
                absmax2[bo + b] = mx2;
            }
        } else {
            m32[so + i] = s1;
            v32[so + i] = s2;
        }
    }
}

#define ADAM8(NAME, G)                                                                                      \
    extern "C" __global__ void NAME(const uint64_t* table, const float* maps, const G* g, unsigned char* c1, \
                                    unsigned char* c2, float* a1, float* a2, float* m32, float* v32, float b1, \
                                    float omb1, float b2, float omb2, float clip, float step_size,          \
                                    float c2eps, float decay, int use_decay, uint64_t key) {                 \
        adam8bit<G>(table, maps, g, c1, c2, a1, a2, m32, v32, b1, omb1, b2, omb2, clip, step_size, c2eps, \
                       decay, use_decay, key);                                                               \
    }
ADAM8(adam8bit_f32, float)
ADAM8(adam8bit_bf16, __nv_bfloat16)
