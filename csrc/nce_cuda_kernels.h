// Launchers of the CUDA epilogue kernels (nce_cuda_kernels.cu). Plain pointers and a
// stream: this header and the .cu include no torch headers, so nvcc compiles them in seconds.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace amdim_kernels {

// Columns of a score chunk one CUDA block reduces (256 threads x 8).
constexpr int64_t kCudaColsPerBlock = 2048;

// Forward epilogue over one chunk of unscaled float32 scores (N x C, row stride ld) whose
// columns are images [m0, m0 + C/L): per (row, block of columns) partials of sum a^2 and the
// negatives' sum of exp(s - shift), written at partial index split_base + blockIdx.y; the
// clipped positives go to pos (N, L).
cudaError_t launch_nce_fwd_epilogue(const float* scores, int64_t ld, int64_t N, int64_t C, int64_t L, int64_t m0,
                                    const int64_t* pos_idx, float scale, float tclip, float* pos, float* part_sum,
                                    float* part_max, float* part_sq, int64_t split_base, cudaStream_t stream);

// Merge the partials of every row in split order; write loss (N, L), neg_lse (N,), sq (N,).
cudaError_t launch_nce_merge(const float* part_sum, const float* part_max, const float* part_sq, int64_t splits,
                             const float* pos, int64_t N, int64_t L, float* loss, float* neg_lse, float* sq,
                             cudaStream_t stream);

// Backward epilogue: G = scale * d(loss + reg)/da over one chunk of unscaled scores, written
// to g (N x C, row stride ldg) as float32 or bfloat16 (g_is_bf16).
cudaError_t launch_nce_grad_epilogue(const float* scores, int64_t ld, int64_t N, int64_t C, int64_t L, int64_t m0,
                                     const int64_t* pos_idx, const float* gpos, const float* r, const float* neg_lse,
                                     const float* reg_coef, float scale, float tclip, void* g, int64_t ldg,
                                     bool g_is_bf16, cudaStream_t stream);

}  // namespace amdim_kernels
