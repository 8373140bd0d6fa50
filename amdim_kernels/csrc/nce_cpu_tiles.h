// The CPU kernels' shared parts (nce_cpu.cpp: the four-product schedule; nce_cpu_fused.cpp:
// the three-product one). A score tile is a block of source rows against a few whole target
// images; a call runs its tiles (or groups of them) in one parallel region, each thread doing
// a tile's products with BLAS on one thread and its epilogue (nce_cpu_epilogue.h) while the
// tile is cache-resident, and merges the partials afterwards in tile order, so that the
// result does not depend on the thread count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "nce_cpu_epilogue.h"
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

// Scores per tile: at most 1 MiB of float32 in the four-product schedule, which a core holds
// in its L2 from the tile's product through its epilogue's pass; 4 MiB in the three-product
// one, whose tiles stay in the block's buffer from the forward's region to the gradients',
// where the fewer, larger products run BLAS closer to its peak (benchmarks.cpu_floor measures
// both choices).
constexpr int64_t kTileElems = 1 << 18;
constexpr int64_t kBlockTileElems = 1 << 20;
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

// Whole images per tile (so that a column's image is known from its segment): at most about
// tile_elems scores for N rows, the count of tiles rounded up to a multiple of kTileMultiple
// (at most M) and the images shared evenly among them, so that the cores get even shares (a
// remainder tile, or 7 tiles for 2 cores, left a core idle for up to a third of the call).
// Where M is small the count can come out lower (M = 5: 3 tiles of 2, 2 and 1 images).
constexpr int64_t kTileMultiple = 4;
inline int64_t images_per_tile(int64_t N, int64_t M, int64_t L, int64_t tile_elems) {
  const int64_t most = std::max<int64_t>(1, tile_elems / (N * L));
  int64_t tiles = (M + most - 1) / most;
  tiles = std::min(M, (tiles + kTileMultiple - 1) / kTileMultiple * kTileMultiple);
  return (M + tiles - 1) / tiles;
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

// The scores a = scale * (src_rows @ cols) of a tile into out (R x C float32): the scale is
// the product's alpha, so that no scaled copy of the sources is made (beta 0: out's values
// are not read).
inline void scores_out(Tensor& out, const Tensor& src_rows, const Tensor& cols, double scale) {
  at::addmm_out(out, out, src_rows, cols, /*beta=*/0, /*alpha=*/scale);
}
inline Tensor scores(const Tensor& src_rows, const Tensor& cols, double scale) {
  Tensor out = at::empty({src_rows.size(0), cols.size(1)}, src_rows.options());
  scores_out(out, src_rows, cols, scale);
  return out;
}

// What both schedules' tiles read: src_f = src as float32 and contiguous (a view for float32
// inputs), the operand of the scores and of d trg; pos_idx contiguous; `rows` source rows a
// tile (all N, or a block's) and the images of each of `tiles` tiles of about tile_elems scores.
struct TileOperands {
  Tensor src_f, idx;
  const int64_t* pos_idx;
  int64_t images, tiles;
  TileOperands(const Tensor& src, const Tensor& pos_idx_in, int64_t rows, int64_t M, int64_t L, int64_t tile_elems)
      : src_f(src.to(at::kFloat).contiguous()),
        idx(pos_idx_in.contiguous()),
        pos_idx(idx.data_ptr<int64_t>()),
        images(images_per_tile(rows, M, L, tile_elems)),
        tiles((M + images - 1) / images) {}
};

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

// Overwrites the (R x C) score tile `a` of images [m0, m1) with g = d(loss + reg)/da times the
// scale the rows' factors carry (backward_rows): nce_cpu_epilogue.h's tile_gradient.
inline void gradient_tile(Tensor& a, int64_t m0, int64_t m1, int64_t L, const int64_t* pos_idx,
                          const BackwardRows& rows, float tclip) {
  tile_gradient(a.data_ptr<float>(), a.size(0), a.size(1), m0, m1, L, pos_idx, tclip, rows.neg_lse.data_ptr<float>(),
                rows.r.data_ptr<float>(), rows.reg_coef.data_ptr<float>(), rows.gpos.data_ptr<float>());
}

// The rows' totals over T tiles from tile_statistics' partials (each T x R), in
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

// R rows' neg_lse (row_lse: NaN where one of the row's scores is not finite) and their L
// losses each, from merge_tiles' totals and the positives' clipped scores pos (R x L).
inline void finish_rows(const RowTotals& totals, const float* pos, int64_t R, int64_t L, float* neg_lse,
                        float* loss) {
  const float* merged = totals.neg_lse.data_ptr<float>();
  const double* sq = totals.sq.data_ptr<double>();
  for (int64_t i = 0; i < R; ++i) {
    neg_lse[i] = row_lse(merged[i], static_cast<float>(sq[i]));
    for (int64_t l = 0; l < L; ++l) loss[i * L + l] = positive_loss(pos[i * L + l], neg_lse[i]);
  }
}

// nce_loss's means: one per group of consecutive rows of the (N x L) losses (group_rows: their
// counts), each summed in float64 in row order (deterministic).
inline Tensor group_means(const Tensor& loss, at::IntArrayRef group_rows) {
  const int64_t L = loss.size(1), K = static_cast<int64_t>(group_rows.size());
  Tensor means = at::empty({K}, loss.options());
  const float* loss_p = loss.data_ptr<float>();
  float* means_p = means.data_ptr<float>();
  int64_t row = 0;
  for (int64_t k = 0; k < K; ++k) {
    double sum = 0.0;
    for (int64_t j = row * L; j < (row + group_rows[k]) * L; ++j) sum += loss_p[j];
    means_p[k] = static_cast<float>(sum / (static_cast<double>(group_rows[k]) * L));
    row += group_rows[k];
  }
  return means;
}

// nce_loss's reg = reg_weight * mean(a^2) over the N*M*L scores, from the rows' float64 sums
// sq (N,), summed in row order; rounded to float32 at the end (a reg past float32's range is
// +inf, which at::full would refuse as a double).
inline Tensor regulariser(const Tensor& sq, int64_t M, int64_t L, double reg_weight, at::TensorOptions f32) {
  const int64_t N = sq.size(0);
  const double* sq_p = sq.data_ptr<double>();
  double total = 0.0;
  for (int64_t i = 0; i < N; ++i) total += sq_p[i];
  return at::full({}, static_cast<float>(reg_weight * total / (static_cast<double>(N) * M * L)), f32);
}

}  // namespace cpu
}  // namespace amdim_kernels
