// CUDA implementation of amdim_kernels::nce_fwd_grad, the three-product schedule: the forward
// also makes the gradients of the reduced objective (the mean loss over all N*L positives +
// reg, as nce_cpu_fused.cpp's), from row blocks of scores that it keeps whole, so that no
// product is made twice. Made only of parts that the four-product schedule (nce_cuda.cpp)
// runs: cuBLAS products accumulating in float32 and the epilogue kernels of
// nce_cuda_kernels.cu, each given the block's rows and all M*L columns at once.
//
// Per block of B source rows (B from the caller's workspace budget):
//   a  = src_block @ trg^T                  (B x M*L float32, cuBLAS: the workspace)
//   the forward epilogue over a, then the merge: the block's losses and statistics, exactly
//   the factors of the objective's upstream (1/(N*L) per positive, reg_weight/(N*M*L) per a^2)
//   g  = scale * d(objective)/da           (the G epilogue, in the inputs' dtype, as the
//                                            four-product backward's: the tensor cores' type)
//   d src_block  = g @ trg                  (float32, then rounded to the inputs' dtype)
//   d trg       += g^T @ src_block          (blocks added in order in float32; with one block,
//                                            the default, one product in the inputs' dtype,
//                                            as the four-product backward's d trg)
// cuBLAS accumulates in float32 (a 16-bit output's split-K partials may be reduced in its
// dtype where torch's allow_bf16/fp16_reduced_precision_reduction allows it, as in the
// four-product backward; d src's long sum over M*L is therefore made in float32). Three
// products of the problem's size in all; no atomics, fixed orders: deterministic.
// float16 inputs are refused: the four-product backward stores their G times a power of two
// found from every row's factors (launch_nce_grad_scale), which one block does not have.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "nce_cuda_host.h"
#include "nce_cuda_kernels.h"
#include "nce_op.h"

namespace amdim_kernels {
namespace {

using at::Tensor;

// One mean per group of consecutive rows of loss (N, L) (group_rows: the groups' row counts),
// each summed in float64.
Tensor group_means(const Tensor& loss, at::IntArrayRef group_rows) {
  std::vector<Tensor> means;
  int64_t row = 0;
  for (const int64_t rows : group_rows) {
    means.push_back(loss.narrow(0, row, rows).sum(at::kDouble) / (static_cast<double>(rows) * loss.size(1)));
    row += rows;
  }
  return at::stack(means).to(at::kFloat);
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> nce_fwd_grad_cuda(
    const Tensor& src, const Tensor& trg, const Tensor& pos_idx, std::optional<double> tclip_opt, double scale,
    double reg_weight, at::IntArrayRef group_rows, int64_t block_rows, bool need_src, bool need_trg) {
  check_inputs(src, trg, pos_idx, at::kCUDA);
  TORCH_CHECK(src.scalar_type() != at::kHalf,
              "amdim_kernels: nce_fwd_grad on CUDA takes float32 and bfloat16 inputs, got float16 (its G's "
              "scale needs every row's factors: the four-product schedule computes it)");
  const NoAutocast no_autocast;  // the op computes in float32 itself; its inner matmuls must not be autocast
  const c10::cuda::CUDAGuard guard(src.device());
  const int64_t N = src.size(0), M = trg.size(0), L = trg.size(1), D = src.size(1), C = M * L;
  check_fwd_grad_args(N, group_rows, block_rows);
  const int64_t B = std::min(N, block_rows);
  const float tclip = kernel_tclip(tclip_opt);
  const auto f32 = src.options().dtype(at::kFloat);
  const Tensor idx = pos_idx.contiguous();
  // every target location as a (M*L x D) matrix: a view when trg's features are contiguous,
  // else one copy of trg (the trainer's feature maps), made once for all blocks
  const Tensor cols = trg.reshape({C, D});
  Tensor loss = at::empty({N, L}, f32), pos = at::empty({N, L}, f32);
  Tensor neg_lse = at::empty({N}, f32), sq = at::empty({N}, f32);
  const bool one_block = B == N;
  Tensor dsrc = at::empty({need_src ? N : 0, D}, src.options());
  Tensor dtrg = at::empty({need_trg ? M : 0, L, D}, one_block ? trg.options() : f32);
  const bool grads = need_src || need_trg;
  Tensor g_buf = at::empty({grads ? B : 0, C}, src.options());
  const int64_t splits = col_blocks(C);
  TORCH_CHECK(splits <= kGridYMax, "amdim_kernels: nce_fwd_grad on CUDA takes at most ", kGridYMax, " * ", kCudaColsPerBlock,
              " target columns M*L, got ", C, " (the epilogue's grid); use the four-product schedule");
  Tensor part_sum = at::empty({splits * B}, f32), part_max = at::empty({splits * B}, f32);
  Tensor part_sq = at::empty({splits * B}, f32);
  const Tensor ones = at::ones({1}, f32);
  const double loss_weight = 1.0 / (static_cast<double>(N) * L);
  const double sq_weight = reg_weight / (static_cast<double>(N) * M * L);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (int64_t i0 = 0; i0 < N; i0 += B) {
    const int64_t R = std::min(B, N - i0);  // the block's rows
    const Tensor src_block = src.narrow(0, i0, R);
    const int64_t* block_idx = idx.data_ptr<int64_t>() + i0;
    const Tensor a = mm_f32(src_block, cols.t());  // unscaled, as chunk_scores's (the workspace)
    // partials (split, row) of the block's R rows at the buffers' start
    check_cuda(launch_nce_fwd_epilogue(a.data_ptr<float>(), a.stride(0), R, C, L, 0, block_idx,
                                       static_cast<float>(scale), tclip, pos.data_ptr<float>() + i0 * L,
                                       part_sum.data_ptr<float>(), part_max.data_ptr<float>(),
                                       part_sq.data_ptr<float>(), 0, stream),
               "nce_fwd_epilogue");
    check_cuda(launch_nce_merge(part_sum.data_ptr<float>(), part_max.data_ptr<float>(), part_sq.data_ptr<float>(),
                                splits, pos.data_ptr<float>() + i0 * L, R, L, loss.data_ptr<float>() + i0 * L,
                                neg_lse.data_ptr<float>() + i0, sq.data_ptr<float>() + i0, stream),
               "nce_merge");
    if (!grads) continue;
    const BackwardRows rows = backward_rows(pos.narrow(0, i0, R), neg_lse.narrow(0, i0, R),
                                            {ones.expand({R, L}), loss_weight, ones.expand({R}), sq_weight});
    Tensor g = g_buf.narrow(0, 0, R);
    check_cuda(launch_nce_grad_epilogue(a.data_ptr<float>(), a.stride(0), R, C, L, 0, block_idx,
                                        rows.gpos.data_ptr<float>(), rows.r.data_ptr<float>(),
                                        rows.neg_lse.data_ptr<float>(), rows.reg_coef.data_ptr<float>(),
                                        static_cast<float>(scale), tclip, g.data_ptr(), g.stride(0),
                                        grad_type(src.scalar_type()), nullptr, stream),
               "nce_grad_epilogue");
    if (need_src) {
      Tensor out = dsrc.narrow(0, i0, R);
      if (src.scalar_type() == at::kFloat) {
        at::mm_out(out, g, cols);
      } else {
        out.copy_(mm_f32(g, cols));
      }
    }
    if (need_trg) {
      Tensor out = dtrg.view({C, D});
      if (one_block) {
        at::mm_out(out, g.t(), src_block);
      } else {  // blocks added in order, in float32
        addmm_f32_(out, g.t(), src_block, i0 == 0 ? 0.0 : 1.0);
      }
    }
  }
  // reg as the four-product forward makes it (nce_totals: 0 where reg_weight is 0, whatever sq)
  Tensor mean = at::empty({}, f32), reg = at::empty({}, f32);
  check_cuda(launch_nce_totals(loss.data_ptr<float>(), sq.data_ptr<float>(), N, L, static_cast<float>(sq_weight),
                               mean.data_ptr<float>(), reg.data_ptr<float>(), stream),
             "nce_totals");
  return {loss, pos, neg_lse, sq, group_means(loss, group_rows), reg, dsrc, dtrg};
}

TORCH_LIBRARY_IMPL(amdim_kernels, CUDA, m) { m.impl("nce_fwd_grad", &nce_fwd_grad_cuda); }

}  // namespace amdim_kernels
