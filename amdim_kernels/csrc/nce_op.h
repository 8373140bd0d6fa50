// The amdim_kernels op library: schemas in nce_op.cpp, CPU kernels in nce_cpu.cpp and
// nce_cpu_fused.cpp, CUDA kernels in nce_cuda.cpp and nce_cuda_fused.cpp (+ the .cu files,
// their host helpers in nce_cuda_host.h). Python validates arguments first
// (amdim_kernels/validation.py); check_inputs only guards the C++ entry points.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <optional>
#include <string>
#include <tuple>

namespace amdim_kernels {

// Inside the op, autocast must not reach the inner at::mm calls: the features come as they
// are and the scores are float32 (under autocast the op itself is a fallthrough).
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// The op's optional tclip as the kernels take it: tclip <= 0 means no clipping (nce_math.h).
inline float kernel_tclip(const std::optional<double>& tclip) {
  return tclip.has_value() ? static_cast<float>(*tclip) : 0.f;
}

// TORCH_CHECKs on shapes, dtypes and devices (cheap: no data is read).
void check_inputs(const at::Tensor& src, const at::Tensor& trg, const at::Tensor& pos_idx, c10::DeviceType device);
// nce_fwd_grad's own arguments: positive group row counts summing to N, positive block rows.
void check_fwd_grad_args(int64_t N, at::IntArrayRef group_rows, int64_t block_rows);

// Per-row quantities of the backward (docs/loss.md#gradients), with sig = sigmoid(neg_lse - pos) = 1 - exp(pos)/Z
// and w the upstream gradient of each positive's loss:
//   gpos     (N, L): dL/ds at the positives, -w * sig
//   r        (N,)  : a negative's dL/ds is r * exp(s - neg_lse), r = sum_l w * sig
//   reg_coef (N,)  : d(reg)/da = reg_coef * a, from the upstream gradient of the row's sum of a^2
struct BackwardRows {
  at::Tensor gpos, r, reg_coef, neg_lse;
};
// The four, uninitialised but for neg_lse (the given one, contiguous), for each device's
// backward to fill in one pass over the rows with nce_math.h's grad_row: one kernel launch
// on a GPU, where ATen ops took six.
BackwardRows empty_backward_rows(const at::Tensor& pos, const at::Tensor& neg_lse);

// The bwd op's upstream gradients (amdim_kernels/op_contract.py): w = loss_weight * grad_loss
// (N, L) for the per-positive losses and sq_weight * grad_sq (N,) for the rows' sums of a^2,
// each float32 with any strides. The autograd formula passes the mean's and reg's gradients as
// one value broadcast (strides 0) with weights 1/(N*L) and reg_weight/(N*M*L): the kernels
// apply them as they read, so no launch forms them.
struct Upstream {
  at::Tensor grad_loss;
  double loss_weight;
  at::Tensor grad_sq;
  double sq_weight;
};

#ifdef AMDIM_WITH_CUDA
// Why CUDA device `device` cannot load the CUDA kernels of this build ("" when it can): an
// architecture TORCH_CUDA_ARCH_LIST left out, with no PTX the driver could compile instead.
std::string cuda_kernel_image_error(int64_t device);
#endif

}  // namespace amdim_kernels
