// Launchers of the CUDA epilogue kernels (nce_cuda_kernels.cu). Plain pointers and a
// stream: this header and the .cu include no torch headers, so nvcc compiles them in seconds.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "nce_shared.h"

namespace amdim_kernels {

// Forward epilogue over one chunk of unscaled float32 scores (N x C, row stride ld) whose
// columns are images [m0, m0 + C/L): per (row, block of columns) partials of sum a^2 and the
// negatives' sum of exp(s - shift), written at partial index split_base + blockIdx.y; the
// clipped positives go to pos (N, L).
cudaError_t launch_nce_fwd_epilogue(const float* scores, int64_t ld, int64_t N, int64_t C, int64_t L, int64_t m0,
                                    const int64_t* pos_idx, float scale, float tclip, float* pos, float* part_sum,
                                    float* part_max, float* part_sq, int64_t split_base, cudaStream_t stream);

// cudaSuccess when the current device can load this library's kernels (a cubin built for
// its architecture family, or PTX that the driver compiles for it); else the error a launch
// would fail with, cudaErrorNoKernelImageForDevice. Both .cu files are built for the same
// TORCH_CUDA_ARCH_LIST, so one kernel answers for all.
cudaError_t nce_kernel_image_status();

// Merge the partials of every row in split order; write loss (N, L), neg_lse (N,), sq (N,).
cudaError_t launch_nce_merge(const float* part_sum, const float* part_max, const float* part_sq, int64_t splits,
                             const float* pos, int64_t N, int64_t L, float* loss, float* neg_lse, float* sq,
                             cudaStream_t stream);

// One block: mean = the mean of loss (N, L) and reg = reg_c * sum_i sq[i], reg_c =
// reg_weight / (N*M*L): nce_loss's two scalars, summed in a fixed order.
cudaError_t launch_nce_totals(const float* loss, const float* sq, int64_t N, int64_t L, float reg_c, float* mean,
                              float* reg, cudaStream_t stream);

// The upstream gradients the backward reads: w[i, l] = loss_weight * grad_loss[i * stride_wn
// + l * stride_wl], that of each positive's loss, and sq_weight * grad_sq[i * stride_sq], that
// of each row's sum of a^2. The autograd formula passes the mean's and reg's as one value
// broadcast (strides 0) with weights 1/(N*L) and reg_weight/(N*M*L), so no launch forms them.
struct UpstreamGrads {
  const float* grad_loss;
  int64_t stride_wn, stride_wl;
  float loss_weight;
  const float* grad_sq;
  int64_t stride_sq;
  float sq_weight;
};

// The backward's per-row factors from the clipped positives pos (N, L, contiguous), the
// upstream gradients and neg_lse (N,): gpos (N, L), r (N,) and reg_coef (N,), as nce_op.h's
// BackwardRows.
cudaError_t launch_nce_grad_rows(const float* pos, const UpstreamGrads& up, const float* neg_lse, int64_t N,
                                 int64_t L, float* gpos, float* r, float* reg_coef, cudaStream_t stream);

// G's element type: the inputs' dtype, so that its two products run on the tensor cores.
enum class GradType { kFloat32, kBFloat16, kFloat16 };

// float16 G is stored times 2^k, the largest power of two with |G| 2^k <= 2^kScaleLog2Target
// and (col_l1 given) |G^T @ src| 2^k <= 2^kScaleLog2Target, so that neither leaves float16's
// range (65504) whatever the upstream gradient (a loss scaler's 2^16 included), and its small
// entries, about 1/(N * M*L) of the largest, stay in float16's normal range.
// k is clamped to +-kScaleMaxExp (both in nce_shared.h).

// One block: from the rows' factors (nce_op.h's BackwardRows), sq (N,) and, for d trg,
// col_l1 (D,) = sum_i |src[i, d]| (else nullptr), bound |G| <= scale * (max(|r|, max_l |gpos|)
// + |reg_coef| sqrt(sq)) (|a| <= sqrt(sq), exp(s - neg_lse) <= 1, 0 <= ds/da <= 1) and write
// out[0] = 2^k, out[1] = 2^-k, exactly. Rows and columns whose bound is not finite are left
// out of it (a poisoned row's G is NaN at any scale). No host sync.
cudaError_t launch_nce_grad_scale(const float* gpos, const float* r, const float* reg_coef, const float* sq,
                                  const float* col_l1, int64_t N, int64_t L, int64_t D, float scale, float* out,
                                  cudaStream_t stream);

// Backward epilogue: G = scale * d(loss + reg)/da over one chunk of unscaled scores, written
// to g (N x C, row stride ldg) as g_type, times *g_scale where g_scale is not nullptr.
cudaError_t launch_nce_grad_epilogue(const float* scores, int64_t ld, int64_t N, int64_t C, int64_t L, int64_t m0,
                                     const int64_t* pos_idx, const float* gpos, const float* r, const float* neg_lse,
                                     const float* reg_coef, float scale, float tclip, void* g, int64_t ldg,
                                     GradType g_type, const float* g_scale, cudaStream_t stream);

// ---- Fused tensor-core kernels for 16-bit inputs (nce_cuda_mma.cu) ----
// A target view: columns [0, C) of images m0, m0 + 1, ... (column j is location j % L of image
// m0 + j / L) at trg + (j / L) * stride_img + (j % L) * stride_loc, D features with unit stride.
// src is (N, D) contiguous. Both are __half (is_bf16 false) or __nv_bfloat16.
struct TargetView {
  const void* trg;
  int64_t stride_img, stride_loc, C, L, m0;
};

// Score tiles of (kMmaRows sources x kMmaCols target columns).
constexpr int64_t kMmaRows = 64;
constexpr int64_t kMmaCols = 128;

// How the forward splits the column tiles of one launch: `splits` blocks per row block, each
// taking `tiles_per_split` consecutive tiles, so that about 4 blocks per SM are in flight.
struct MmaSplit {
  int64_t splits, tiles_per_split;
};
inline MmaSplit mma_split(int64_t N, int64_t C, int64_t sms) {
  const int64_t tiles = (C + kMmaCols - 1) / kMmaCols, row_blocks = (N + kMmaRows - 1) / kMmaRows;
  const int64_t want = std::min(tiles, std::max<int64_t>(1, (4 * sms + row_blocks - 1) / row_blocks));
  const int64_t per = (tiles + want - 1) / want;
  return {(tiles + per - 1) / per, per};
}

// Forward, fused: scores, sum a^2, soft clip, the negatives' sum of exp and the positives,
// with the partials of split k at index split_base + k, as launch_nce_fwd_epilogue's.
cudaError_t launch_nce_fwd_mma(const void* src, int64_t N, int64_t D, const TargetView& view, bool is_bf16,
                               const int64_t* pos_idx, float scale, float tclip, MmaSplit split, float* pos,
                               float* part_sum, float* part_max, float* part_sq, int64_t split_base,
                               cudaStream_t stream);

// Backward, fused: recomputes the scores of the view's columns and writes G to g (N x C, row
// stride ldg) in the inputs' dtype, times *g_scale where g_scale is not nullptr (float16).
cudaError_t launch_nce_grad_mma(const void* src, int64_t N, int64_t D, const TargetView& view, bool is_bf16,
                                const int64_t* pos_idx, const float* gpos, const float* r, const float* neg_lse,
                                const float* reg_coef, float scale, float tclip, void* g, int64_t ldg,
                                const float* g_scale, cudaStream_t stream);

}  // namespace amdim_kernels
