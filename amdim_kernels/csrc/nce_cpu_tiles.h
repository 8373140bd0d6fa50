// The CPU kernels' shared parts (nce_cpu.cpp: the four-product schedule; nce_cpu_fused.cpp:
// the three-product one). A score tile is a block of source rows against a few whole target
// images; a call runs its tiles (or groups of them) in one parallel region, each thread doing
// a tile's products with BLAS on one thread and its epilogue with ATen's vectorised ops while
// the tile is cache-resident, and merges the partials afterwards in tile order, so that the
// result does not depend on the thread count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "nce_math.h"
#include "nce_op.h"

// MKL's per-thread thread count (its C interface), where torch's CPU library carries MKL (x86
// builds); a weak symbol, so that the extension also loads where it does not (the guard below
// then does nothing, and the BLAS's own threading is what it is).
#if defined(__GNUC__)
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
#define AMDIM_HAVE_MKL_LOCAL 1
#else
#define AMDIM_HAVE_MKL_LOCAL 0
#endif

namespace amdim_kernels {
namespace cpu {

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
inline int64_t images_per_tile(int64_t N, int64_t M, int64_t L, int64_t tile_elems = kTileElems) {
  const int64_t ipt = std::max<int64_t>(1, tile_elems / (N * L));
  return M >= 2 ? std::min(ipt, (M + 1) / 2) : ipt;
}

// The backward's d src partial sums: one (N x D) float32 sum per group of consecutive tiles,
// as many groups as tiles while they fit kGroupBytes, and at least kMinGroups (so that the
// groups keep up to that many cores busy); their number depends on the problem only, so that
// the sums' order does not depend on the thread count.
constexpr int64_t kGroupBytes = int64_t{4} << 20;
constexpr int64_t kMinGroups = 8;
inline int64_t group_count(int64_t tiles, int64_t N, int64_t D) {
  const int64_t fit = std::max<int64_t>(kMinGroups, kGroupBytes / std::max<int64_t>(1, 4 * N * D));
  return std::min(tiles, fit);
}

// trg[m0:m1] as a float32 (D x C) matrix, C = (m1 - m0) * L, column (j - m0) * L + l being
// location l of image j. When trg's features are contiguous this is a transposed view (a
// copy only for another dtype); for the trainer's layout, feature maps (M, D, H*W) seen as
// (M, L, D), it is a copy made of whole runs of L locations, twice as fast as gathering each
// location's D features one stride apart.
inline Tensor target_cols(const Tensor& trg, int64_t m0, int64_t m1) {
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
inline Tensor scaled_sources(const Tensor& src, double scale) { return at::mul(src.to(at::kFloat), scale).contiguous(); }

// The backward's per-row factors (nce_op.h's BackwardRows) times `scale`, rows spread over
// the cores; the upstream gradients read through their strides (0 where one value is
// broadcast).
inline BackwardRows backward_rows(const Tensor& pos, const Tensor& neg_lse, const Upstream& up, double scale) {
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
inline Tensor row_squares(const Tensor& a) {
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
inline void gradient_tile(Tensor& a, int64_t m0, int64_t m1, int64_t L, const int64_t* pos_idx, const BackwardRows& rows,
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


// The forward's statistics of one tile from its soft-clipped scores s (R x C, images [m0, m1),
// overwritten): the positives copied to pos_rows (R x L, row-major), then per row the shift
// (tclip where shift_by_tclip, nce_math.h; else the tile's maximum over the negatives) and the
// negatives' sum of exp(s - shift), summed in float32 (ATen's vectorised pairwise sums) and
// returned in float64. With the fixed shift exp(s) itself lies in [e^-40, e^40] (|s| < tclip <=
// 40), so the tile sums it in float32 with no overflow or underflow and exp(-tclip) scales the
// sums in float64.
inline void negative_sums(Tensor& s, int64_t m0, int64_t m1, int64_t L, const int64_t* pos_idx, float* pos_rows,
                          float tclip, Tensor shift_out, Tensor sum_out) {
  const int64_t R = s.size(0);
  // positives: store them, then set them to -inf so that exp() drops them from the sums
  for_positive_segments(s.data_ptr<float>(), R, m0, m1, L, pos_idx, [&](int64_t i, float* seg) {
    std::copy(seg, seg + L, pos_rows + i * L);
    std::fill(seg, seg + L, -kInf);
  });
  if (shift_by_tclip(tclip)) {
    shift_out.fill_(tclip);
    sum_out.copy_(s.exp_().sum(1).to(at::kDouble).mul_(std::exp(-static_cast<double>(tclip))));
  } else {
    const Tensor shift = s.amax(1, true);
    shift_out.copy_(shift.squeeze(1));
    const Tensor safe = shift.masked_fill(shift == -kInf, 0.f);  // no exp(-inf - -inf)
    sum_out.copy_(s.sub_(safe).exp_().sum(1).to(at::kDouble));
  }
}

// The rows' totals over T tiles from negative_sums' and row_squares' partials (each T x R), in
// tile order: neg_lse (R,) float32 = shift + log(sum), before row_lse (-inf's log(0) where the
// row has no negatives, M == 1, is taken as 0: its loss is then 0), and the sum of a^2 (R,)
// float64.
struct RowTotals {
  Tensor neg_lse, sq;
};
inline RowTotals merge_tiles(const Tensor& tile_shift_in, const Tensor& tile_sum_in, const Tensor& tile_sq_in) {
  const Tensor tile_shift = tile_shift_in.contiguous(), tile_sum = tile_sum_in.contiguous();
  const Tensor tile_sq = tile_sq_in.contiguous();
  const int64_t T = tile_shift.size(0), R = tile_shift.size(1);
  const Tensor shift = tile_shift.amax(0);  // tclip in every tile with the fixed shift
  Tensor sum = at::zeros({R}, tile_sum.options()), sqsum = at::zeros({R}, tile_sq.options());
  const float *ts = tile_shift.data_ptr<float>(), *sh = shift.data_ptr<float>();
  const double *tsum = tile_sum.data_ptr<double>(), *tsq = tile_sq.data_ptr<double>();
  double *sum_p = sum.data_ptr<double>(), *sq_p = sqsum.data_ptr<double>();
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t i = 0; i < R; ++i) {
      const float tile_max = ts[t * R + i];
      // a tile whose row holds only positives (-inf) adds nothing
      if (tile_max != -kInf) sum_p[i] += tsum[t * R + i] * std::exp(static_cast<double>(tile_max) - sh[i]);
      sq_p[i] += tsq[t * R + i];
    }
  }
  return {(shift.masked_fill(shift == -kInf, 0.f) + sum.log()).to(at::kFloat), sqsum};
}

}  // namespace cpu
}  // namespace amdim_kernels
