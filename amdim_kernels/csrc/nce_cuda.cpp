// CUDA implementation of amdim_kernels::nce_fwd / nce_bwd, with two ways to make the scores:
// - "cublas": cuBLAS products (tensor cores; float32 output for 16-bit inputs, TF32
//   for float32 where torch allows it), one chunk of whole images at a time (about 1/8 of the
//   columns), each reduced in one pass by the epilogue kernels of nce_cuda_kernels.cu. Memory:
//   one (N x C) float32 score chunk (+ one G chunk in the backward), never N x M*L.
// - "mma" (float16 and bfloat16 inputs): the fused WMMA kernels of nce_cuda_mma.cu, whose
//   score tiles live in shared memory only. The forward needs no chunk at all; the backward
//   writes G chunks, as the cuBLAS path, but no score chunk.
// The op's cuda_scores argument (Settings.cuda_scores) picks one; "auto" lets the problem's size
// decide (use_mma).
// Both: G chunks then go through two cuBLAS products; deterministic (no atomics, fixed merge
// order).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "nce_cuda_host.h"
#include "nce_cuda_kernels.h"
#include "nce_op.h"

namespace amdim_kernels {
namespace {

using at::Tensor;

int64_t sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Images per chunk (nce_shared.h's rule, which the Triton backend applies too), with at least
// 4 * SMs / N column blocks, about 4 blocks per SM over the N rows, so that small problems
// still fill the GPU.
int64_t chunk_images(int64_t N, int64_t M, int64_t L, int64_t bytes_per_column, int64_t cols_per_tile) {
  const int64_t fill_cols = std::max<int64_t>(1, 4 * sm_count() / std::max<int64_t>(N, 1)) * kCudaColsPerBlock;
  return amdim_kernels::images_per_chunk(M, L, bytes_per_column, fill_cols, cols_per_tile);
}

// Bytes a chunk holds per column: cuBLAS's float32 scores (N per column) unless the WMMA
// kernels make them, a copy of the chunk's features (D per column) where trg's are not
// contiguous, and in the backward G itself (N per column, in the features' dtype).
int64_t column_bytes(const Tensor& src, const Tensor& trg, bool mma, bool backward) {
  const int64_t N = src.size(0), D = trg.size(2), elem = trg.element_size();
  int64_t bytes = mma ? 0 : 4 * N;
  if (trg.stride(2) != 1) bytes += D * elem;
  if (backward) bytes += N * elem;
  return bytes;
}

// Unscaled scores of every source with images [m0, m1): (N, C) float32 from cuBLAS.
Tensor chunk_scores(const Tensor& src, const Tensor& trg, int64_t m0, int64_t m1) {
  const Tensor tile = trg.narrow(0, m0, m1 - m0).reshape({-1, trg.size(2)});
  return mm_f32(src, tile.t());
}

// The fused WMMA kernels for this call? `scores` is Settings.cuda_scores: "auto", "cublas" or
// "mma"; float32 always takes cuBLAS, which honours torch's allow_tf32 setting. "auto" takes
// the WMMA kernels for 16-bit inputs on sm_80+ when the scores' work N*M*L*D is at most
// kMmaMaxWork: measured on an H100 (bf16, benchmarks/RESULTS.md), they win on AMDIM's per-GPU
// problems (N = 120-200, up to 1.3e10) and lose on the single-GPU one (N = M = 1024, 1.05e11).
constexpr double kMmaMaxWork = 34359738368.0;  // 2^35, between the two measured classes

bool use_mma(const Tensor& src, const Tensor& trg, c10::string_view scores) {
  TORCH_CHECK(scores == "auto" || scores == "cublas" || scores == "mma",
              "amdim_kernels: cuda_scores must be 'auto', 'cublas' or 'mma', got '", scores, "'");
  if (scores == "cublas" || src.scalar_type() == at::kFloat) return false;
  const int major = at::cuda::getCurrentDeviceProperties()->major;
  if (scores == "auto") {
    const double work = static_cast<double>(src.size(0)) * trg.size(0) * trg.size(1) * src.size(1);
    return major >= 8 && work <= kMmaMaxWork;
  }
  TORCH_CHECK(major >= 8, "amdim_kernels: cuda_scores='mma' needs compute capability 8.0 or newer, ",
              "this GPU has ", major, ".x; use 'cublas' or 'auto'");
  return true;
}

// Images [m0, m1) of trg with unit stride along D, as the WMMA kernels read them: a view when
// trg has it, else a copy of just those images.
Tensor feature_contiguous(const Tensor& trg, int64_t m0, int64_t m1) {
  const Tensor images = trg.narrow(0, m0, m1 - m0);
  return images.stride(2) == 1 ? images : images.contiguous();
}

TargetView view_of(const Tensor& images, int64_t m0) {
  return {images.data_ptr(), images.stride(0), images.stride(1), images.size(0) * images.size(1), images.size(1), m0};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> nce_fwd_cuda(const Tensor& src, const Tensor& trg,
                                                                        const Tensor& pos_idx,
                                                                        std::optional<double> tclip_opt, double scale,
                                                                        double reg_weight, c10::string_view cuda_scores) {
  check_inputs(src, trg, pos_idx, at::kCUDA);
  const NoAutocast no_autocast;  // the op computes in float32 itself; its inner matmuls must not be autocast
  const c10::cuda::CUDAGuard guard(src.device());
  const int64_t N = src.size(0), M = trg.size(0), L = trg.size(1);
  const float tclip = kernel_tclip(tclip_opt);
  const auto f32 = src.options().dtype(at::kFloat);
  const Tensor idx = pos_idx.contiguous();
  const bool mma = use_mma(src, trg, cuda_scores);
  const Tensor src_c = mma ? src.contiguous() : src;
  // the fused kernels take the whole target at once when its features are contiguous
  // (the WMMA forward's grid is (row blocks, splits); the epilogue's, (rows, column blocks))
  const int64_t ipc = mma && trg.stride(2) == 1
                          ? M
                          : chunk_images(N, M, L, column_bytes(src, trg, mma, false), kCudaColsPerBlock);
  const int64_t sms = sm_count();
  auto splits_of = [&](int64_t C) { return mma ? mma_split(N, C, sms).splits : col_blocks(C); };

  int64_t splits = 0;
  for (int64_t m0 = 0; m0 < M; m0 += ipc) splits += splits_of((std::min(M, m0 + ipc) - m0) * L);
  Tensor part_sum = at::empty({splits, N}, f32), part_max = at::empty({splits, N}, f32);
  Tensor part_sq = at::empty({splits, N}, f32);
  Tensor pos = at::empty({N, L}, f32);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  int64_t split_base = 0;
  for (int64_t m0 = 0; m0 < M; m0 += ipc) {
    const int64_t m1 = std::min(M, m0 + ipc), C = (m1 - m0) * L;
    if (mma) {
      const Tensor images = feature_contiguous(trg, m0, m1);
      check_cuda(launch_nce_fwd_mma(src_c.data_ptr(), N, src.size(1), view_of(images, m0),
                                    src.scalar_type() == at::kBFloat16, idx.data_ptr<int64_t>(),
                                    static_cast<float>(scale), tclip, mma_split(N, C, sms), pos.data_ptr<float>(),
                                    part_sum.data_ptr<float>(), part_max.data_ptr<float>(),
                                    part_sq.data_ptr<float>(), split_base, stream),
                 "nce_fwd_mma");
    } else {
      const Tensor s = chunk_scores(src, trg, m0, m1);
      check_cuda(launch_nce_fwd_epilogue(s.data_ptr<float>(), s.stride(0), N, C, L, m0, idx.data_ptr<int64_t>(),
                                         static_cast<float>(scale), tclip, pos.data_ptr<float>(),
                                         part_sum.data_ptr<float>(), part_max.data_ptr<float>(),
                                         part_sq.data_ptr<float>(), split_base, stream),
                 "nce_fwd_epilogue");
    }
    split_base += splits_of(C);
  }
  Tensor loss = at::empty({N, L}, f32), neg_lse = at::empty({N}, f32), sq = at::empty({N}, f32);
  check_cuda(launch_nce_merge(part_sum.data_ptr<float>(), part_max.data_ptr<float>(), part_sq.data_ptr<float>(),
                              splits, pos.data_ptr<float>(), N, L, loss.data_ptr<float>(), neg_lse.data_ptr<float>(),
                              sq.data_ptr<float>(), stream),
             "nce_merge");
  Tensor mean = at::empty({}, f32), reg = at::empty({}, f32);
  check_cuda(launch_nce_totals(loss.data_ptr<float>(), sq.data_ptr<float>(), N, L,
                               static_cast<float>(reg_weight / (static_cast<double>(N) * M * L)),
                               mean.data_ptr<float>(), reg.data_ptr<float>(), stream),
             "nce_totals");
  return {loss, pos, neg_lse, sq, mean, reg};
}

namespace {
// (2^k, 2^-k) float32 on the device: the power of two float16 G is stored times
// (nce_cuda_kernels.h), from the rows' factors, sq, and for d trg src's column L1 norms.
Tensor float16_grad_scale(const Tensor& src, const BackwardRows& rows, const Tensor& sq, double scale,
                          bool need_trg) {
  const Tensor sq_c = sq.contiguous();
  // d trg = G^T @ src grows |G| by at most max_d sum_i |src[i, d]|
  const Tensor col_l1 = need_trg ? at::linalg_vector_norm(src, 1, {0}, false, at::kFloat) : Tensor();
  Tensor out = at::empty({2}, src.options().dtype(at::kFloat));
  check_cuda(launch_nce_grad_scale(rows.gpos.data_ptr<float>(), rows.r.data_ptr<float>(),
                                   rows.reg_coef.data_ptr<float>(), sq_c.data_ptr<float>(),
                                   need_trg ? col_l1.data_ptr<float>() : nullptr, src.size(0), rows.gpos.size(1),
                                   src.size(1), static_cast<float>(scale), out.data_ptr<float>(),
                                   at::cuda::getCurrentCUDAStream()),
             "nce_grad_scale");
  return out;
}

// d src's float32 sum over the chunks, in the last 4*N*D bytes of d trg's buffer where they
// fit 16-byte aligned, else undefined. The chunks write d trg image by image in order, so
// those bytes are free until the last chunk's product (or an earlier chunk's that reaches
// them): until then the sum costs no memory of its own (as triton_nce/backward.py's).
Tensor src_sum_in_tail(const Tensor& dtrg, int64_t N, int64_t D) {
  const int64_t bytes = dtrg.numel() * dtrg.element_size(), need = 4 * N * D;
  if (bytes < need) return Tensor();
  const Tensor tail = dtrg.view(-1).view(at::kByte).narrow(0, bytes - need, need);
  if (reinterpret_cast<uintptr_t>(tail.data_ptr()) % 16 != 0) return Tensor();
  return tail.view(at::kFloat).view({N, D});
}
}  // namespace

std::tuple<Tensor, Tensor> nce_bwd_cuda(const Tensor& src, const Tensor& trg, const Tensor& pos_idx,
                                        const Tensor& pos, const Tensor& neg_lse, const Tensor& sq,
                                        const Tensor& grad_loss, double loss_weight, const Tensor& grad_sq,
                                        double sq_weight, std::optional<double> tclip_opt, double scale,
                                        c10::string_view cuda_scores, bool need_src, bool need_trg) {
  check_inputs(src, trg, pos_idx, at::kCUDA);
  const NoAutocast no_autocast;  // the op computes in float32 itself; its inner matmuls must not be autocast
  const c10::cuda::CUDAGuard guard(src.device());
  const int64_t N = src.size(0), M = trg.size(0), L = trg.size(1), D = src.size(1);
  const float tclip = kernel_tclip(tclip_opt);
  const BackwardRows rows = backward_rows(pos, neg_lse, {grad_loss, loss_weight, grad_sq, sq_weight});
  const Tensor idx = pos_idx.contiguous();
  const bool mma = use_mma(src, trg, cuda_scores);
  const Tensor src_c = mma ? src.contiguous() : src;
  // G in the inputs' dtype, so that both products run on the tensor cores for 16-bit inputs:
  // bf16 has float32's range; fp16 G would flush its small entries, about 1/(N*M*L) of the
  // upstream gradient, or overflow under a loss scaler's, so it is stored times a power of
  // two found on the device, and the products are multiplied back by its inverse, exactly
  const bool half = src.scalar_type() == at::kHalf;
  const Tensor g_scale = half ? float16_grad_scale(src, rows, sq, scale, need_trg) : Tensor();
  const float* g_scale_p = half ? g_scale.data_ptr<float>() : nullptr;
  const int64_t ipc = chunk_images(N, M, L, column_bytes(src, trg, mma, true), mma ? kMmaCols : kCudaColsPerBlock);
  Tensor g_buf = at::empty({N, ipc * L}, src.options());
  Tensor dtrg = at::empty({need_trg ? M : 0, L, D}, trg.options());
  Tensor dsrc_acc = need_src ? src_sum_in_tail(dtrg, N, D) : Tensor();
  bool in_tail = dsrc_acc.defined();
  if (need_src && !in_tail) dsrc_acc = at::empty({N, D}, src.options().dtype(at::kFloat));
  const int64_t tail_begin = dtrg.numel() * dtrg.element_size() - 4 * N * D;  // the sum's first byte
  Tensor dsrc;
  // d src in the inputs' dtype from its float32 sum; float16's is times 2^k, undone in the
  // same launch that rounds it
  auto src_grad = [&](const Tensor& acc, bool copy) {
    if (!half) return acc.to(src.scalar_type(), /*non_blocking=*/false, copy);
    Tensor out = at::empty({N, D}, src.options());
    return at::mul_out(out, acc, g_scale[1]);
  };
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (int64_t m0 = 0; m0 < M; m0 += ipc) {
    const int64_t m1 = std::min(M, m0 + ipc), C = (m1 - m0) * L;
    Tensor g = g_buf.narrow(1, 0, C);
    const Tensor images = mma ? feature_contiguous(trg, m0, m1) : trg.narrow(0, m0, m1 - m0);
    if (mma) {
      check_cuda(launch_nce_grad_mma(src_c.data_ptr(), N, D, view_of(images, m0), src.scalar_type() == at::kBFloat16,
                                     idx.data_ptr<int64_t>(), rows.gpos.data_ptr<float>(), rows.r.data_ptr<float>(),
                                     rows.neg_lse.data_ptr<float>(), rows.reg_coef.data_ptr<float>(),
                                     static_cast<float>(scale), tclip, g.data_ptr(), g.stride(0), g_scale_p, stream),
                 "nce_grad_mma");
    } else {
      const Tensor s = chunk_scores(src, trg, m0, m1);
      check_cuda(launch_nce_grad_epilogue(s.data_ptr<float>(), s.stride(0), N, C, L, m0, idx.data_ptr<int64_t>(),
                                          rows.gpos.data_ptr<float>(), rows.r.data_ptr<float>(),
                                          rows.neg_lse.data_ptr<float>(), rows.reg_coef.data_ptr<float>(),
                                          static_cast<float>(scale), tclip, g.data_ptr(), g.stride(0),
                                          grad_type(src.scalar_type()), g_scale_p, stream),
                 "nce_grad_epilogue");
    }  // the score chunk is freed before the two products
    const Tensor tile = images.reshape({C, D});
    if (need_src) {  // d src += G @ trg_chunk in float32 (no temporary from torch 2.12 on:
                     // addmm_f32_); the first chunk's product writes the sum (beta 0
                     // ignores what the memory held)
      const double beta = m0 == 0 ? 0.0 : 1.0;
      addmm_f32_(dsrc_acc, g, tile, beta);
    }
    if (need_trg) {  // d trg_chunk = G^T @ src
      if (in_tail && m1 * L * D * dtrg.element_size() > tail_begin) {
        // this chunk's d trg overwrites the sum: after the last chunk's product the sum is
        // d src; after an earlier one it moves to memory of its own
        if (m1 == M) {
          dsrc = src_grad(dsrc_acc, /*copy=*/true);
        } else {
          dsrc_acc = dsrc_acc.clone();
        }
        in_tail = false;
      }
      Tensor out = dtrg.narrow(0, m0, m1 - m0).view({C, D});
      at::mm_out(out, g.t(), src);  // cuBLAS accumulates in float32, rounds once
    }
  }
  if (!dsrc.defined()) {  // the sum has memory of its own here
    dsrc = need_src ? src_grad(dsrc_acc, /*copy=*/false) : at::empty({0, D}, src.options());
  }
  if (half && need_trg) dtrg.mul_(g_scale[1]);  // by a power of two: exact unless subnormal
  return {dsrc, dtrg};
}

std::string cuda_kernel_image_error(int64_t device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const cudaError_t err = nce_kernel_image_status();
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

TORCH_LIBRARY_IMPL(amdim_kernels, CUDA, m) {
  m.impl("nce_fwd", &nce_fwd_cuda);
  m.impl("nce_bwd", &nce_bwd_cuda);
}

}  // namespace amdim_kernels
