// Host-side helpers that both CUDA schedules share: the four-product ops (nce_cuda.cpp) and
// the three-product forward (nce_cuda_fused.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <torch/version.h>

#include "nce_cuda_kernels.h"
#include "nce_op.h"

namespace amdim_kernels {

inline void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "amdim_kernels: ", what, " failed: ", cudaGetErrorString(err));
}

// Column blocks of the epilogue kernels' grid over C columns (their partials' split count).
inline int64_t col_blocks(int64_t C) { return ceil_div(C, kCudaColsPerBlock); }

// G's element type for the inputs' dtype.
inline GradType grad_type(at::ScalarType dtype) {
  return dtype == at::kBFloat16 ? GradType::kBFloat16 : dtype == at::kHalf ? GradType::kFloat16 : GradType::kFloat32;
}

// The backward's per-row factors (nce_op.h's BackwardRows) in one launch, the upstream
// gradients read through their strides.
inline BackwardRows backward_rows(const at::Tensor& pos, const at::Tensor& neg_lse, const Upstream& up) {
  const BackwardRows rows = empty_backward_rows(pos, neg_lse);
  const at::Tensor pos_c = pos.contiguous();
  const UpstreamGrads grads{up.grad_loss.data_ptr<float>(), up.grad_loss.stride(0), up.grad_loss.stride(1),
                            static_cast<float>(up.loss_weight), up.grad_sq.data_ptr<float>(), up.grad_sq.stride(0),
                            static_cast<float>(up.sq_weight)};
  check_cuda(launch_nce_grad_rows(pos_c.data_ptr<float>(), grads, rows.neg_lse.data_ptr<float>(), pos.size(0),
                                  pos.size(1), rows.gpos.data_ptr<float>(), rows.r.data_ptr<float>(),
                                  rows.reg_coef.data_ptr<float>(), at::cuda::getCurrentCUDAStream()),
             "nce_grad_rows");
  return rows;
}

// a @ b in float32: float32 operands, or both 16-bit with cuBLAS's float32 output (aten's
// mm.dtype, which these kernels have run with since torch 2.11).
inline at::Tensor mm_f32(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == at::kFloat ? at::mm(a, b) : at::mm(a, b, at::kFloat);
}

// aten's addmm.dtype_out with out aliasing self (a float32 sum of 16-bit products, no
// temporary) is taken from torch 2.12 on, where other libraries rely on it; with older
// releases, which these kernels have not run it with, the product is a float32 temporary.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 12)
#define AMDIM_ADDMM_F32_IN_PLACE 1
#else
#define AMDIM_ADDMM_F32_IN_PLACE 0
#endif

// out = a @ b + beta * out, out float32, a and b float32 or both 16-bit (cuBLAS accumulates
// in float32); beta 0 ignores what out held.
inline void addmm_f32_(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta) {
  if (a.scalar_type() == at::kFloat) {
    out.addmm_(a, b, beta);
    return;
  }
#if AMDIM_ADDMM_F32_IN_PLACE
  at::addmm_out(out, out, a, b, at::kFloat, beta);
#else
  const at::Tensor product = at::mm(a, b, at::kFloat);
  if (beta == 0.0) {
    out.copy_(product);
  } else {
    if (beta != 1.0) out.mul_(beta);
    out.add_(product);
  }
#endif
}

}  // namespace amdim_kernels
