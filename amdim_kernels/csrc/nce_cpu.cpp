// CPU implementation of amdim_kernels::nce_fwd / nce_bwd, the four-product schedule (the
// backward makes the scores again; nce_cpu_fused.cpp has the three-product one): the streaming
// algorithm of the GPU kernels, blocked for caches (nce_cpu_tiles.h). One tile = every source
// row against a few whole target images (at most about kTileElems scores). Each call is one
// parallel region over independent tiles (the forward) or groups of tiles (the backward): a
// thread computes its tile's float32 scores with BLAS and reduces or transforms them in one
// vectorised pass (nce_cpu_epilogue.h) while they are cache-resident, all on its own core
// (inside the region BLAS runs single-threaded), and the per-tile
// or per-group partials are merged afterwards in tile order. So no op of a tile waits at a
// barrier for the other cores (on a shared machine a descheduled thread held every such
// barrier), and the result does not depend on the thread count. Nothing of size N x M*L is
// allocated.
//
// A tile's product is its scores a themselves: the scale is the product's alpha
// (scores_out). Forward: per-row sum of a^2 and the negatives' sum of exp(s - shift)
// (shift = tclip with clipping up to tclip = 40; else the tile's maximum), the positives
// copied out. Backward: per tile, g = scale * dL/da (scale folded into the rows' factors, as
// the GPU kernels form G, so that no product is 1/scale larger than its result), then
// d trg_tile = g^T @ src (the tile owns those rows) and, per group, d src += g @ trg_tile in
// float32; the groups' sums are added in group order. Deterministic.
#include <torch/library.h>

#include "nce_cpu_tiles.h"

namespace amdim_kernels {

using at::Tensor;
using namespace cpu;

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
  const TileOperands ops(src, pos_idx, N, M, L, kTileElems);
  const Tensor& src_f = ops.src_f;
  const int64_t* p_idx = ops.pos_idx;
  float* pos_p = pos.data_ptr<float>();
  const int64_t ipt = ops.images, tiles = ops.tiles;
  // per tile and row: the shift, the negatives' sum of exp(s - shift) and the sum of a^2
  // (tile_statistics), merged in tile order
  const auto d64 = src.options().dtype(at::kDouble);
  Tensor tile_shift = at::empty({tiles, N}, f32), tile_sum = at::empty({tiles, N}, d64);
  Tensor tile_sq = at::empty({tiles, N}, d64);
  for_each_part(tiles, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t m0 = t * ipt, m1 = std::min(M, m0 + ipt);
      const Tensor a = scores(src_f, target_cols(trg, m0, m1), scale);
      tile_statistics(a.data_ptr<float>(), N, a.size(1), m0, m1, L, p_idx, tclip, pos_p,
                      tile_shift[t].data_ptr<float>(), tile_sum[t].data_ptr<double>(), tile_sq[t].data_ptr<double>());
    }
  });
  const RowTotals totals = merge_tiles(tile_shift, tile_sum, tile_sq);
  finish_rows(totals, pos_p, N, L, neg_lse.data_ptr<float>(), loss.data_ptr<float>());
  sq.copy_(totals.sq);
  const int64_t one_group[] = {N};
  const Tensor mean = group_means(loss, one_group).squeeze(0);
  return {loss, pos, neg_lse, sq, mean, regulariser(totals.sq, M, L, reg_weight, f32)};
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
  const TileOperands ops(src, pos_idx, N, M, L, kTileElems);
  const Tensor& src_f = ops.src_f;
  const int64_t* p_idx = ops.pos_idx;
  const int64_t ipt = ops.images, tiles = ops.tiles;
  const int64_t groups = need_src ? group_count(tiles, N, D) : tiles;
  Tensor dtrg = at::empty({need_trg ? M : 0, L, D}, trg.options());
  Tensor group_dsrc = at::empty({need_src ? groups : 0, N, D}, src_f.options());
  for_each_part(groups, [&](int64_t g_begin, int64_t g_end) {
    for (int64_t group = g_begin; group < g_end; ++group) {
      // the group's tiles: consecutive, an even share of them
      const int64_t t_begin = group * tiles / groups, t_end = (group + 1) * tiles / groups;
      for (int64_t t = t_begin; t < t_end; ++t) {
        const int64_t m0 = t * ipt, m1 = std::min(M, m0 + ipt);
        const Tensor cols = target_cols(trg, m0, m1);
        Tensor g = scores(src_f, cols, scale);  // overwritten with g = scale * dL/da
        gradient_tile(g, m0, m1, L, p_idx, rows, tclip);  // in place
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
  Tensor dsrc_acc = at::zeros({need_src ? N : 0, D}, src_f.options());
  for (int64_t group = 0; group < (need_src ? groups : 0); ++group) dsrc_acc.add_(group_dsrc[group]);  // in order
  Tensor dsrc = dsrc_acc.to(src.scalar_type());  // d src = sum over the groups of g @ trg_tile
  return {dsrc, dtrg};
}

// One tile's epilogue with a named version of nce_cpu_epilogue.h (the test of each version
// the CPU runs): a (R x C) float32 raw scores of images [m0, m1) -> the positives' s (R x L,
// 0 where the row's image is not in the tile), shift, sum and sq (R,) of tile_statistics, and
// g (R x C) of tile_gradient from the given rows' factors.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> epilogue_tile_cpu(
    const Tensor& a, const Tensor& pos_idx, int64_t m0, int64_t m1, int64_t L, std::optional<double> tclip_opt,
    const Tensor& neg_lse, const Tensor& r, const Tensor& reg_coef, const Tensor& gpos, c10::string_view version) {
  TORCH_CHECK(a.dim() == 2 && a.scalar_type() == at::kFloat && L > 0 && m1 > m0 && a.size(1) == (m1 - m0) * L,
              "amdim_kernels: epilogue_tile expects a float32 (R, (m1 - m0) * L) tile, got ", a.sizes());
  const int64_t R = a.size(0), C = a.size(1);
  for (const Tensor* row : {&neg_lse, &r, &reg_coef}) {
    TORCH_CHECK(row->dim() == 1 && row->size(0) == R && row->scalar_type() == at::kFloat,
                "amdim_kernels: epilogue_tile expects float32 (R,) row factors, got ", row->sizes());
  }
  TORCH_CHECK(pos_idx.dim() == 1 && pos_idx.size(0) == R && pos_idx.scalar_type() == at::kLong,
              "amdim_kernels: epilogue_tile expects int64 (R,) pos_idx, got ", pos_idx.sizes());
  TORCH_CHECK(gpos.dim() == 2 && gpos.size(0) == R && gpos.size(1) == L && gpos.scalar_type() == at::kFloat,
              "amdim_kernels: epilogue_tile expects float32 (R, L) gpos, got ", gpos.sizes());
  const float tclip = kernel_tclip(tclip_opt);
  const Tensor tile = a.contiguous(), idx = pos_idx.contiguous();
  const Tensor lse = neg_lse.contiguous(), r_c = r.contiguous(), reg_c = reg_coef.contiguous();
  const Tensor gpos_c = gpos.contiguous();
  Tensor pos = at::zeros({R, L}, a.options()), shift = at::empty({R}, a.options());
  Tensor sum = at::empty({R}, a.options().dtype(at::kDouble)), sq = at::empty({R}, sum.options());
  const std::string name(version);
  tile_statistics_version(name, tile.data_ptr<float>(), R, C, m0, m1, L, idx.data_ptr<int64_t>(), tclip,
                          pos.data_ptr<float>(), shift.data_ptr<float>(), sum.data_ptr<double>(), sq.data_ptr<double>());
  Tensor g = tile.clone();
  tile_gradient_version(name, g.data_ptr<float>(), R, C, m0, m1, L, idx.data_ptr<int64_t>(), tclip,
                        lse.data_ptr<float>(), r_c.data_ptr<float>(), reg_c.data_ptr<float>(), gpos_c.data_ptr<float>());
  return {pos, shift, sum, sq, g};
}

TORCH_LIBRARY_IMPL(amdim_kernels, CPU, m) {
  m.impl("nce_fwd", &nce_fwd_cpu);
  m.impl("nce_bwd", &nce_bwd_cpu);
  m.impl("epilogue_tile", &epilogue_tile_cpu);
}

}  // namespace amdim_kernels
