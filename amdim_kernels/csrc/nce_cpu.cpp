// CPU implementation of amdim_kernels::nce_fwd / nce_bwd: the streaming algorithm of the GPU
// kernels, blocked for caches. One tile = every source row against a few whole target images
// (about kTileElems scores). Per tile, BLAS computes the float32 scores and ATen's vectorised
// ops (parallel over the cores through at::parallel_for) reduce or transform them while they
// are cache-resident; nothing of size N x M*L is allocated.
//
// The sources are scaled once per call (src_s = scale * src), so that a tile's product is its
// scores a themselves. Forward: per-row sum of a^2 and the negatives' sum of exp(s - shift)
// (shift = tclip with clipping up to tclip = 40; else an online maximum), the positives
// copied out. Backward: per tile, g = scale * dL/da (scale folded into the rows' factors, as
// the GPU kernels form G, so that no product is 1/scale larger than its result), then
// d trg_tile = g^T @ src (the tile owns those rows) and d src += g @ trg_tile in float32,
// tiles in order: three products like eager autograd, deterministic. Each step is one ATen
// op over the tile where it can be (an op is a pass over the tile).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "nce_math.h"
#include "nce_op.h"

namespace amdim_kernels {
namespace {

using at::Tensor;

// Scores per tile: 1 MiB of float32. A tile's ops split it over the cores, so each core's
// share stays in its L2 (2 MiB here); larger products also run BLAS closer to its peak. At N =
// M = 256, L = 49, D = 256, float32 (2 cores, benchmarks.run --preset cpu) fwd+bwd took 31.7 ms
// with 2^18 and 30.1 with 2^19 (noise about 5%); the backward holds three tiles.
constexpr int64_t kTileElems = 1 << 18;
constexpr float kInf = std::numeric_limits<float>::infinity();

// Whole images per tile (so that a column's image is known from its segment), about
// kTileElems scores for N rows.
int64_t images_per_tile(int64_t N, int64_t L) { return std::max<int64_t>(1, kTileElems / (N * L)); }

// trg[m0:m1] as a float32 (D x C) matrix, C = (m1 - m0) * L, column (j - m0) * L + l being
// location l of image j. When trg's features are contiguous this is a transposed view (a
// copy only for another dtype); for the trainer's layout, feature maps (M, D, H*W) seen as
// (M, L, D), it is a copy made of whole runs of L locations, twice as fast as gathering each
// location's D features one stride apart.
Tensor target_cols(const Tensor& trg, int64_t m0, int64_t m1) {
  const Tensor images = trg.narrow(0, m0, m1 - m0);
  const int64_t D = trg.size(2);
  if (images.stride(2) != 1 && images.stride(1) == 1) {
    Tensor cols = at::empty({D, m1 - m0, trg.size(1)}, images.options().dtype(at::kFloat));
    cols.copy_(images.permute({2, 0, 1}));
    return cols.view({D, -1});
  }
  return images.reshape({-1, D}).to(at::kFloat).t();
}

// src as the tiles' products take it: float32, times scale, contiguous (a copy of its own).
Tensor scaled_sources(const Tensor& src, double scale) { return at::mul(src.to(at::kFloat), scale).contiguous(); }

// The backward's per-row factors (nce_op.h's BackwardRows) times `scale`, rows spread over
// the cores; the upstream gradients read through their strides (0 where one value is
// broadcast).
BackwardRows backward_rows(const Tensor& pos, const Tensor& neg_lse, const Upstream& up, double scale) {
  const BackwardRows rows = empty_backward_rows(pos, neg_lse);
  const Tensor pos_c = pos.contiguous();
  const int64_t L = pos.size(1);
  const int64_t wn = up.grad_loss.stride(0), wl = up.grad_loss.stride(1), sn = up.grad_sq.stride(0);
  const float w_weight = static_cast<float>(up.loss_weight * scale);
  const float sq_weight = static_cast<float>(up.sq_weight * scale);
  const float *pos_p = pos_c.data_ptr<float>(), *w_p = up.grad_loss.data_ptr<float>();
  const float* w_sq_p = up.grad_sq.data_ptr<float>();
  const float* lse_p = rows.neg_lse.data_ptr<float>();
  float *gpos_p = rows.gpos.data_ptr<float>(), *r_p = rows.r.data_ptr<float>();
  float* reg_p = rows.reg_coef.data_ptr<float>();
  at::parallel_for(0, pos.size(0), 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      r_p[i] = grad_row(pos_p + i * L, w_p + i * wn, wl, w_weight, lse_p[i], L, gpos_p + i * L);
      reg_p[i] = 2.f * sq_weight * w_sq_p[i * sn];
    }
  });
  return rows;
}

// Each row's sum of a^2 over the (N x C) score tile, in float64. One pass in float32, the
// squared 2-norm (no tile-sized temporary), where it is finite; a row where it is not is
// summed again in float64, whose range holds any sum of float32 squares: its sum is then
// NaN exactly when one of its scores is not finite (square_or_nan, the row's poison) and
// finite otherwise, so reg stays exact where float32's sum would overflow.
Tensor row_squares(const Tensor& a) {
  Tensor sq = at::linalg_vector_norm(a, 2, {1}, false, std::nullopt).square_().to(at::kDouble);
  if (at::isfinite(sq).all().item<bool>()) return sq;
  const int64_t C = a.size(1);
  const float* a_p = a.data_ptr<float>();
  double* sq_p = sq.data_ptr<double>();
  for (int64_t i = 0; i < a.size(0); ++i) {
    if (std::isfinite(sq_p[i])) continue;
    double acc = 0.0;
    for (int64_t j = 0; j < C; ++j) {
      const float v = a_p[i * C + j];
      acc += static_cast<double>(v) * v + static_cast<double>(v - v);
    }
    sq_p[i] = acc;
  }
  return sq;
}

// Calls f(i, seg) for each row i whose positive image p lies in [m0, m1); seg points at
// that image's L columns of row i in the (N x C) tile.
template <typename F>
void for_positive_segments(float* tile, int64_t N, int64_t m0, int64_t m1, int64_t L, const int64_t* pos_idx, F f) {
  const int64_t C = (m1 - m0) * L;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t p = pos_idx[i];
    if (p >= m0 && p < m1) f(i, tile + i * C + (p - m0) * L);
  }
}

// Overwrites the (N x C) score tile `a` of images [m0, m1) with g = d(loss + reg)/da times
// the scale the rows' factors carry (backward_rows), in five ATen ops without clipping and
// nine with it.
void gradient_tile(Tensor& a, int64_t m0, int64_t m1, int64_t L, const int64_t* pos_idx, const BackwardRows& rows,
                   float tclip) {
  const Tensor neg_lse = rows.neg_lse.unsqueeze(1);
  // u = s / tclip = tanh(a / tclip) with clipping, and s - neg_lse = tclip u - neg_lse
  const Tensor u = tclip > 0.f ? at::mul(a, 1.0 / tclip).tanh_() : Tensor();
  Tensor dl_ds = tclip > 0.f ? at::add(neg_lse.neg(), u, tclip) : at::sub(a, neg_lse);
  // negatives: dL/ds = r * exp(s - neg_lse), <= r since neg_lse bounds every negative
  dl_ds.exp_().mul_(rows.r.unsqueeze(1));
  const float* gpos = rows.gpos.data_ptr<float>();
  for_positive_segments(dl_ds.data_ptr<float>(), a.size(0), m0, m1, L, pos_idx, [&](int64_t i, float* seg) {
    std::copy(gpos + i * L, gpos + (i + 1) * L, seg);  // positives: dL/ds = gpos
  });
  // g = reg_coef * a + dL/ds * ds/da, ds/da = 1 - u^2 with clipping: dL/ds - (dL/ds u) u
  a.mul_(rows.reg_coef.unsqueeze(1)).add_(dl_ds);
  if (tclip > 0.f) a.addcmul_(dl_ds.mul_(u), u, -1.0);
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> nce_fwd_cpu(const Tensor& src, const Tensor& trg,
                                                                       const Tensor& pos_idx,
                                                                       std::optional<double> tclip_opt, double scale,
                                                                       double reg_weight, c10::string_view /*cuda_scores*/) {
  check_inputs(src, trg, pos_idx, at::kCPU);
  const NoAutocast no_autocast;  // the op computes in float32 itself; its inner matmuls must not be autocast
  const int64_t N = src.size(0), M = trg.size(0), L = trg.size(1);
  const float tclip = kernel_tclip(tclip_opt);
  const auto f32 = src.options().dtype(at::kFloat);
  Tensor loss = at::empty({N, L}, f32), pos = at::empty({N, L}, f32);
  Tensor neg_lse = at::empty({N}, f32), sq = at::empty({N}, f32);
  const Tensor src_s = scaled_sources(src, scale);
  const Tensor idx = pos_idx.contiguous();
  const int64_t* p_idx = idx.data_ptr<int64_t>();
  float* pos_p = pos.data_ptr<float>();
  const int64_t ipt = images_per_tile(N, L);
  // Per-row state. Tiles are reduced in float32 (ATen's vectorised kernels, pairwise sums);
  // their partials accumulate across tiles in float64: the shift (tclip where shift_by_tclip,
  // nce_math.h; else a running maximum), the negatives' sum of exp(s - shift), and the sum of
  // a^2.
  const auto d64 = src.options().dtype(at::kDouble);
  const bool fixed_shift = shift_by_tclip(tclip);
  Tensor shift = at::full({N, 1}, fixed_shift ? tclip : -kInf, f32);
  // With the fixed shift, exp(s) itself lies in [e^-40, e^40] (|s| < tclip <= 40): a tile sums
  // it in float32 with no overflow or underflow, and exp(-tclip) scales the sums in float64.
  const double unshift = fixed_shift ? std::exp(-static_cast<double>(tclip)) : 1.0;
  Tensor sum = at::zeros({N, 1}, d64), sqsum = at::zeros({N}, d64);
  for (int64_t m0 = 0; m0 < M; m0 += ipt) {
    const int64_t m1 = std::min(M, m0 + ipt);
    Tensor a = at::mm(src_s, target_cols(trg, m0, m1));  // the scores
    sqsum.add_(row_squares(a));
    if (tclip > 0.f) a.div_(tclip).tanh_().mul_(tclip);
    // positives: store them, then set them to -inf so that exp() drops them from the sums
    for_positive_segments(a.data_ptr<float>(), N, m0, m1, L, p_idx, [&](int64_t i, float* seg) {
      std::copy(seg, seg + L, pos_p + i * L);
      std::fill(seg, seg + L, -kInf);
    });
    if (!fixed_shift) {  // online log-sum-exp: rescale the running sums to the new maximum
      const Tensor new_shift = at::maximum(shift, a.amax(1, true));
      const Tensor safe = new_shift.masked_fill(new_shift == -kInf, 0.f);  // no exp(-inf - -inf)
      sum.mul_((shift - safe).exp_()).add_(a.sub_(safe).exp_().sum(1, true));
      shift = new_shift;
    } else {
      sum.add_(a.exp_().sum(1, true).to(at::kDouble).mul_(unshift));
    }
  }
  // log(0) = -inf when the row has no negatives (M == 1): its loss is then 0
  neg_lse.copy_((shift + sum.log()).squeeze(1));
  sq.copy_(sqsum);
  float* lse_p = neg_lse.data_ptr<float>();
  const double* sq_p = sqsum.data_ptr<double>();
  float* loss_p = loss.data_ptr<float>();
  // nce_loss's two scalars, summed in float64 in row order (deterministic)
  double loss_sum = 0.0, sq_sum = 0.0;
  for (int64_t i = 0; i < N; ++i) {
    lse_p[i] = row_lse(lse_p[i], static_cast<float>(sq_p[i]));  // NaN where a score is not finite
    for (int64_t l = 0; l < L; ++l) {
      loss_p[i * L + l] = positive_loss(pos_p[i * L + l], lse_p[i]);
      loss_sum += loss_p[i * L + l];
    }
    sq_sum += sq_p[i];
  }
  const Tensor mean = at::full({}, loss_sum / static_cast<double>(N * L), f32);
  // rounded to float32 here: a reg past float32's range is +inf (at::full would refuse it)
  const auto reg_value = static_cast<float>(reg_weight * sq_sum / (static_cast<double>(N) * M * L));
  const Tensor reg = at::full({}, reg_value, f32);
  return {loss, pos, neg_lse, sq, mean, reg};
}

std::tuple<Tensor, Tensor> nce_bwd_cpu(const Tensor& src, const Tensor& trg, const Tensor& pos_idx,
                                       const Tensor& pos, const Tensor& neg_lse,
                                       const Tensor& /*sq: only the CUDA backward's float16 G needs it*/,
                                       const Tensor& grad_loss, double loss_weight, const Tensor& grad_sq,
                                       double sq_weight, std::optional<double> tclip_opt, double scale,
                                       c10::string_view /*cuda_scores*/, bool need_src, bool need_trg) {
  check_inputs(src, trg, pos_idx, at::kCPU);
  const NoAutocast no_autocast;  // the op computes in float32 itself; its inner matmuls must not be autocast
  const int64_t N = src.size(0), M = trg.size(0), L = trg.size(1), D = src.size(1);
  const float tclip = kernel_tclip(tclip_opt);
  const BackwardRows rows = backward_rows(pos, neg_lse, {grad_loss, loss_weight, grad_sq, sq_weight}, scale);
  const Tensor src_s = scaled_sources(src, scale);
  const Tensor src_f = src.to(at::kFloat).contiguous();  // d trg's operand: a view for float32
  const Tensor idx = pos_idx.contiguous();
  const int64_t* p_idx = idx.data_ptr<int64_t>();
  const int64_t ipt = images_per_tile(N, L);
  Tensor dtrg = at::empty({need_trg ? M : 0, L, D}, trg.options());
  Tensor dsrc_acc = at::zeros({need_src ? N : 0, D}, src_s.options());
  for (int64_t m0 = 0; m0 < M; m0 += ipt) {
    const int64_t m1 = std::min(M, m0 + ipt);
    const Tensor cols = target_cols(trg, m0, m1);
    Tensor g = at::mm(src_s, cols);  // the scores, overwritten with g = scale * dL/da
    gradient_tile(g, m0, m1, L, p_idx, rows, tclip);
    if (need_trg) {  // owned rows, g^T @ src, written in place when dtrg is float32, else
                     // rounded once
      Tensor rows_out = dtrg.narrow(0, m0, m1 - m0).view({-1, D});
      if (dtrg.scalar_type() == at::kFloat) {
        at::mm_out(rows_out, g.t(), src_f);
      } else {
        rows_out.copy_(at::mm(g.t(), src_f));
      }
    }
    if (need_src) dsrc_acc.addmm_(g, cols.t());  // float32, tiles in order
  }
  Tensor dsrc = dsrc_acc.to(src.scalar_type());  // d src = sum_tiles g @ trg_tile
  return {dsrc, dtrg};
}

TORCH_LIBRARY_IMPL(amdim_kernels, CPU, m) {
  m.impl("nce_fwd", &nce_fwd_cpu);
  m.impl("nce_bwd", &nce_bwd_cpu);
}

}  // namespace amdim_kernels
