// Row gather out[i, :] = x[idx[i], :] for 2-D contiguous tensors whose rows are whole 16-byte
// words (`src/rows.rs`): one warp per output row, 16-byte loads and stores.
#include <stdint.h>

// An index >= n (out of range) gives a zero row instead of an out-of-bounds read.
extern "C" __global__ void gather_rows16(const uint4* __restrict__ x, uint64_t n, const uint32_t* __restrict__ idx,
                                         uint4* __restrict__ out, uint64_t rows, uint32_t words) {
    const uint64_t r = (blockIdx.x * (uint64_t)blockDim.x + threadIdx.x) / 32;
    const uint32_t lane = threadIdx.x & 31;
    if (r >= rows) return;
    const uint64_t i = idx[r];
    uint4* dst = out + r * words;
    if (i >= n) {
        for (uint32_t w = lane; w < words; w += 32) dst[w] = make_uint4(0, 0, 0, 0);
        return;
    }
    const uint4* src = x + i * words;
    for (uint32_t w = lane; w < words; w += 32) dst[w] = src[w];
}
