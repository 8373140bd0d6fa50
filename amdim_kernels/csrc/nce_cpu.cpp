// CPU implementation of amdim_kernels::nce_fwd / nce_bwd: the streaming algorithm of the GPU
// kernels, blocked for caches. One tile = every source row against a few whole target images
// (about kTileElems scores). Each call is one parallel region over independent tiles (the
// forward) or groups of tiles (the backward): a thread computes its tile's float32 scores with
// BLAS and reduces or transforms them with ATen's vectorised ops while they are cache-resident,
// all on its own core (inside the region BLAS and ATen run single-threaded), and the per-tile
// or per-group partials are merged afterwards in tile order. So no op of a tile waits at a
// barrier for the other cores (on a shared machine a descheduled thread held every such
// barrier), and the result does not depend on the thread count. Nothing of size N x M*L is
// allocated.
//
// The sources are scaled once per call (src_s = scale * src), so that a tile's product is its
// scores a themselves. Forward: per-row sum of a^2 and the negatives' sum of exp(s - shift)
// (shift = tclip with clipping up to tclip = 40; else the tile's maximum), the positives
// copied out. Backward: per tile, g = scale * dL/da (scale folded into the rows' factors, as
// the GPU kernels form G, so that no product is 1/scale larger than its result), then
// d trg_tile = g^T @ src (the tile owns those rows) and, per group, d src += g @ trg_tile in
// float32; the groups' sums are added in group order. Deterministic.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "nce_math.h"
#include "nce_op.h"

// MKL's per-thread thread count (its C interface), where torch's CPU library carries MKL (x86
// builds); a weak
// symbol, so that the extension also loads where it does not (the guard below then does
// nothing, and the BLAS's own threading is what it is).
#if defined(__GNUC__)
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
#define AMDIM_HAVE_MKL_LOCAL 1
#else
#define AMDIM_HAVE_MKL_LOCAL 0
#endif

namespace amdim_kernels {
namespace {

using at::Tensor;

// A worker of the call's parallel region: the caller's thread-local state (autograd below the
// op, autocast off) and BLAS on one thread while it lives.
struct TileWorker {
  at::ThreadLocalStateGuard state;
  explicit TileWorker(const at::ThreadLocalState& caller) : state(caller) {}
};

// BLAS on one thread for the calling thread while it lives. torch switches MKL's dynamic
// adjustment off, so inside a parallel region MKL would still split a product over the
// process's thread count, and a small product's sum in another order for each count.
struct SingleThreadedBlas {
  int before = 0;
#if AMDIM_HAVE_MKL_LOCAL
  SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) before = MKL_Set_Num_Threads_Local(1);
  }
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(before);
  }
#else
  SingleThreadedBlas() = default;
#endif
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;
};

// Scores per tile: 1 MiB of float32, which a core holds in its L2 with the backward's two
// tile-sized temporaries close by; larger products also run BLAS closer to its peak
// (benchmarks.cpu_floor measures the choice).
constexpr int64_t kTileElems = 1 << 18;
constexpr float kInf = std::numeric_limits<float>::infinity();

// Runs f(begin, end) over [0, n) parts of independent work. With OpenMP (torch's Linux
// builds, the extension compiled with -fopenmp): one parallel region, each worker with the
// caller's thread-local state and BLAS on one thread, the parts fixed by the problem, so the
// result does not depend on the thread count. Without it at::parallel_for would run the parts
// on one thread with every ATen op inside held to one thread too, so the parts run in turn on
// the caller's thread instead, where each op parallelises itself.
template <typename F>
void for_each_part(int64_t n, const F& f) {
#ifdef _OPENMP
  const at::ThreadLocalState caller;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    const TileWorker worker(caller);
    const SingleThreadedBlas one_thread;
    f(begin, end);
  });
#else
  f(0, n);
#endif
}

// Whole images per tile (so that a column's image is known from its segment), about
// kTileElems scores for N rows, and at least two tiles where there are two images, so that
// two cores share even a small problem.
int64_t images_per_tile(int64_t N, int64_t M, int64_t L) {
  const int64_t ipt = std::max<int64_t>(1, kTileElems / (N * L));
  return M >= 2 ? std::min(ipt, (M + 1) / 2) : ipt;
}

// The backward's d src partial sums: one (N x D) float32 sum per group of consecutive tiles,
// as many groups as tiles while they fit kGroupBytes, and at least kMinGroups (so that the
// groups keep up to that many cores busy); their number depends on the problem only, so that
// the sums' order does not depend on the thread count.
constexpr int64_t kGroupBytes = int64_t{4} << 20;
constexpr int64_t kMinGroups = 8;
int64_t group_count(int64_t tiles, int64_t N, int64_t D) {
  const int64_t fit = std::max<int64_t>(kMinGroups, kGroupBytes / std::max<int64_t>(1, 4 * N * D));
  return std::min(tiles, fit);
}

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
  const int64_t ipt = images_per_tile(N, M, L);
  const int64_t tiles = (M + ipt - 1) / ipt;
  // Per tile and row: the shift (tclip where shift_by_tclip, nce_math.h; else the tile's
  // maximum), the negatives' sum of exp(s - shift), and the sum of a^2; tiles are reduced in
  // float32 (ATen's vectorised kernels, pairwise sums), their partials merged in float64.
  const auto d64 = src.options().dtype(at::kDouble);
  const bool fixed_shift = shift_by_tclip(tclip);
  // With the fixed shift, exp(s) itself lies in [e^-40, e^40] (|s| < tclip <= 40): a tile sums
  // it in float32 with no overflow or underflow, and exp(-tclip) scales the sums in float64.
  const double unshift = fixed_shift ? std::exp(-static_cast<double>(tclip)) : 1.0;
  Tensor tile_shift = at::empty({tiles, N}, f32), tile_sum = at::empty({tiles, N}, d64);
  Tensor tile_sq = at::empty({tiles, N}, d64);
  for_each_part(tiles, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t m0 = t * ipt, m1 = std::min(M, m0 + ipt);
      Tensor a = at::mm(src_s, target_cols(trg, m0, m1));  // the scores
      tile_sq[t].copy_(row_squares(a));
      if (tclip > 0.f) a.div_(tclip).tanh_().mul_(tclip);
      // positives: store them, then set them to -inf so that exp() drops them from the sums
      for_positive_segments(a.data_ptr<float>(), N, m0, m1, L, p_idx, [&](int64_t i, float* seg) {
        std::copy(seg, seg + L, pos_p + i * L);
        std::fill(seg, seg + L, -kInf);
      });
      if (fixed_shift) {
        tile_shift[t].fill_(tclip);
        tile_sum[t].copy_(a.exp_().sum(1).to(at::kDouble).mul_(unshift));
      } else {
        const Tensor shift = a.amax(1, true);
        tile_shift[t].copy_(shift.squeeze(1));
        const Tensor safe = shift.masked_fill(shift == -kInf, 0.f);  // no exp(-inf - -inf)
        tile_sum[t].copy_(a.sub_(safe).exp_().sum(1).to(at::kDouble));
      }
    }
  });
  // the rows' shift and sum over the tiles, in tile order
  Tensor shift = tile_shift.amax(0);  // tclip in every tile with the fixed shift
  Tensor sum = at::zeros({N}, d64), sqsum = at::zeros({N}, d64);
  {
    const float *ts = tile_shift.data_ptr<float>(), *sh = shift.data_ptr<float>();
    const double *tsum = tile_sum.data_ptr<double>(), *tsq = tile_sq.data_ptr<double>();
    double *sum_p = sum.data_ptr<double>(), *sq_p = sqsum.data_ptr<double>();
    for (int64_t t = 0; t < tiles; ++t) {
      for (int64_t i = 0; i < N; ++i) {
        const float tile_max = ts[t * N + i];
        // a tile whose row holds only positives (-inf) adds nothing
        if (tile_max != -kInf) sum_p[i] += tsum[t * N + i] * std::exp(static_cast<double>(tile_max) - sh[i]);
        sq_p[i] += tsq[t * N + i];
      }
    }
  }
  // log(0) = -inf when the row has no negatives (M == 1): its loss is then 0
  neg_lse.copy_(shift.masked_fill(shift == -kInf, 0.f) + sum.log());
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
  const int64_t ipt = images_per_tile(N, M, L);
  const int64_t tiles = (M + ipt - 1) / ipt;
  const int64_t groups = need_src ? group_count(tiles, N, D) : tiles;
  Tensor dtrg = at::empty({need_trg ? M : 0, L, D}, trg.options());
  Tensor group_dsrc = at::empty({need_src ? groups : 0, N, D}, src_s.options());
  for_each_part(groups, [&](int64_t g_begin, int64_t g_end) {
    for (int64_t group = g_begin; group < g_end; ++group) {
      // the group's tiles: consecutive, an even share of them
      const int64_t t_begin = group * tiles / groups, t_end = (group + 1) * tiles / groups;
      for (int64_t t = t_begin; t < t_end; ++t) {
        const int64_t m0 = t * ipt, m1 = std::min(M, m0 + ipt);
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
        if (need_src) {  // float32, tiles in order within the group
          Tensor acc = group_dsrc[group];
          if (t == t_begin) {
            at::mm_out(acc, g, cols.t());
          } else {
            acc.addmm_(g, cols.t());
          }
        }
      }
    }
  });
  Tensor dsrc_acc = at::zeros({need_src ? N : 0, D}, src_s.options());
  for (int64_t group = 0; group < (need_src ? groups : 0); ++group) dsrc_acc.add_(group_dsrc[group]);  // in order
  Tensor dsrc = dsrc_acc.to(src.scalar_type());  // d src = sum over the groups of g @ trg_tile
  return {dsrc, dtrg};
}

TORCH_LIBRARY_IMPL(amdim_kernels, CPU, m) {
  m.impl("nce_fwd", &nce_fwd_cpu);
  m.impl("nce_bwd", &nce_bwd_cpu);
}

}  // namespace amdim_kernels
