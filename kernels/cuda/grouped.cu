// Segmented transposed products for the experts' weight gradients (`src/grouped.rs`,
// `grouped_matmul_tn`): out[g] = a[rows_g]ᵀ · b[rows_g] for consecutive row groups, every group
// in one launch. cuBLAS's grouped GEMM runs groups whose inner dimension (the group's row count)
// differs as separate launches; here one grid covers them all: blockIdx.z is the group, each
// block a 64×64 tile of its (m, n) output, four warps of 2×2 bf16/f16 tensor-core fragments
// with f32 accumulation over 32-row chunks staged in shared memory (read 16 bytes at a time
// when rows are whole 16-byte words). An empty group gets zeros.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <stdint.h>

using namespace nvcuda;

#define TM 64
#define TN 64
#define TK 32
#define PAD 8

__device__ __forceinline__ void from_f32(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void from_f32(__half* p, float v) { *p = __float2half_rn(v); }

template <typename T>
__device__ void grouped_tn(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out,
                           const uint64_t* __restrict__ starts, const uint32_t* __restrict__ counts,
                           uint32_t m, uint32_t n, int vec) {
    __shared__ __align__(32) T as[TK][TM + PAD];
    __shared__ __align__(32) T bs[TK][TN + PAD];
    __shared__ __align__(32) float cs[TM][TN + 4];
    const uint32_t g = blockIdx.z;
    const uint32_t m0 = blockIdx.y * TM, n0 = blockIdx.x * TN;
    const uint64_t r0 = starts[g];
    const uint32_t rows = counts[g];
    const int warp = threadIdx.x / 32;
    const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++) wmma::fill_fragment(acc[i][j], 0.f);
    const T zero = T(0.f);
    for (uint32_t k0 = 0; k0 < rows; k0 += TK) {
        if (vec) {
            // Eight values (16 bytes) at a time; a vector that leaves the rows or columns is
            // read value by value.
            for (int e = threadIdx.x; e < TK * TM / 8; e += blockDim.x) {
                const int kk = e / (TM / 8), c = (e % (TM / 8)) * 8;
                const uint32_t r = k0 + kk, col = m0 + c;
                if (r < rows && col + 8 <= m) {
                    *(uint4*)&as[kk][c] = *(const uint4*)&a[(r0 + r) * m + col];
                } else {
                    for (int v = 0; v < 8; v++) as[kk][c + v] = (r < rows && col + v < m) ? a[(r0 + r) * m + col + v] : zero;
                }
            }
            for (int e = threadIdx.x; e < TK * TN / 8; e += blockDim.x) {
                const int kk = e / (TN / 8), c = (e % (TN / 8)) * 8;
                const uint32_t r = k0 + kk, col = n0 + c;
                if (r < rows && col + 8 <= n) {
                    *(uint4*)&bs[kk][c] = *(const uint4*)&b[(r0 + r) * n + col];
                } else {
                    for (int v = 0; v < 8; v++) bs[kk][c + v] = (r < rows && col + v < n) ? b[(r0 + r) * n + col + v] : zero;
                }
            }
        } else {
            for (int e = threadIdx.x; e < TK * TM; e += blockDim.x) {
                const int kk = e / TM, c = e % TM;
                const uint32_t r = k0 + kk, col = m0 + c;
                as[kk][c] = (r < rows && col < m) ? a[(r0 + r) * m + col] : zero;
            }
            for (int e = threadIdx.x; e < TK * TN; e += blockDim.x) {
                const int kk = e / TN, c = e % TN;
                const uint32_t r = k0 + kk, col = n0 + c;
                bs[kk][c] = (r < rows && col < n) ? b[(r0 + r) * n + col] : zero;
            }
        }
        __syncthreads();
        for (int kk = 0; kk < TK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
            for (int i = 0; i < 2; i++) wmma::load_matrix_sync(fa[i], &as[kk][wm + 16 * i], TM + PAD);
            for (int j = 0; j < 2; j++) wmma::load_matrix_sync(fb[j], &bs[kk][wn + 16 * j], TN + PAD);
            for (int i = 0; i < 2; i++)
                for (int j = 0; j < 2; j++) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
        __syncthreads();
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++)
            wmma::store_matrix_sync(&cs[wm + 16 * i][wn + 16 * j], acc[i][j], TN + 4, wmma::mem_row_major);
    __syncthreads();
    T* o = out + (uint64_t)g * m * n;
    for (int e = threadIdx.x; e < TM * TN; e += blockDim.x) {
        const int i = e / TN, j = e % TN;
        const uint32_t row = m0 + i, col = n0 + j;
        if (row < m && col < n) from_f32(&o[(uint64_t)row * n + col], cs[i][j]);
    }
}

extern "C" __global__ void grouped_tn_bf16(const __nv_bfloat16* a, const __nv_bfloat16* b, __nv_bfloat16* out,
                                           const uint64_t* starts, const uint32_t* counts, uint32_t m, uint32_t n, int vec) {
    grouped_tn(a, b, out, starts, counts, m, n, vec);
}
extern "C" __global__ void grouped_tn_f16(const __half* a, const __half* b, __half* out,
                                          const uint64_t* starts, const uint32_t* counts, uint32_t m, uint32_t n, int vec) {
    grouped_tn(a, b, out, starts, counts, m, n, vec);
}
