// Constants, and the chunking rule, that the C++/CUDA kernels share with the Triton kernels
// (amdim_kernels/shared_constants.py holds the same values for Python). The extension exposes
// these (_C.SHARED_CONSTANTS, _C.images_per_chunk) and tests/test_shared_constants.py checks
// that both sides agree. No torch headers: .cu files compiled by nvcc alone include it.
#pragma once

#include <algorithm>
#include <cstdint>

namespace amdim_kernels {

// The backward (and a forward that stages scores or copies features) works on chunks of whole
// images, about 1/kChunkParts of the columns each: more chunks, less memory, more launches.
constexpr int64_t kChunkParts = 8;
// ... but a chunk's buffers need not be smaller than this: fewer, larger chunks cost no GPU
// time, only memory, and each chunk costs host time that AMDIM's small per-GPU problems wait on.
constexpr int64_t kMinChunkBytes = int64_t{8} << 20;
// CUDA's cap on a grid's second axis, which counts a chunk's column tiles.
constexpr int64_t kGridYMax = 65535;
// Columns of a score chunk one block of the CUDA epilogue kernels reduces (256 threads x 8):
// the three-product schedule's launches over all M*L columns take at most kGridYMax of them.
constexpr int64_t kCudaColsPerBlock = 2048;
// The largest tclip whose constant shift the kernels take: with clipping every s lies in
// (-tclip, tclip), so exp(s - tclip) <= 1 never overflows and, while tclip <= 40, stays above
// exp(-80) = 1.8e-35, a normal float32 (GPUs flush subnormals to 0). A larger tclip could flush
// every term of a row to 0, so it takes a running maximum, as no clipping does.
constexpr float kMaxShiftTclip = 40.f;
// float16 G is stored times 2^k so that |G| and |G^T @ src| stay within 2^kScaleLog2Target
// (float16's largest finite value is 65504); k is clamped to +-kScaleMaxExp.
constexpr int kScaleLog2Target = 15;
constexpr int kScaleMaxExp = 100;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Images per chunk of M images of L locations: about 1/parts of them, but no more chunks than
// it takes to keep each chunk's buffers (bytes_per_column) within floor_bytes, at least
// fill_columns columns (what fills the GPU), and no more than kGridYMax tiles of cols_per_tile
// columns; then evened out over the chunks that makes, so that the last is not a sliver.
inline int64_t images_per_chunk(int64_t M, int64_t L, int64_t bytes_per_column, int64_t fill_columns,
                                int64_t cols_per_tile, int64_t floor_bytes = kMinChunkBytes,
                                int64_t parts = kChunkParts) {
  const int64_t chunks = std::clamp<int64_t>(ceil_div(M * L * bytes_per_column, std::max<int64_t>(floor_bytes, 1)),
                                             1, parts);
  const int64_t grid_images = std::max<int64_t>(1, kGridYMax * cols_per_tile / L);
  const int64_t images = std::min({M, std::max(ceil_div(M, chunks), ceil_div(fill_columns, L)), grid_images});
  return ceil_div(M, ceil_div(M, images));
}

}  // namespace amdim_kernels
