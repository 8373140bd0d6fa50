// CPU implementation of amdim_kernels::nce_fwd_grad, the three-product schedule: the forward
// also makes the gradients of the reduced objective, from row blocks of scores that it keeps
// whole, so that no product is made twice (the four-product schedule, nce_cpu.cpp, makes the
// scores again in its backward).
//
// The objective is  sum_k (n_k / N) mean_k + reg  = the mean over all N*L positives + reg,
// mean_k being the mean loss of group k's n_k source rows: its gradients, times one upstream
// scalar, are those of any objective weighting each group's mean by n_k/N against reg
// (three_product.py's backward checks the upstream, and otherwise calls the four-product
// backward).
//
// Per block of B source rows (B from the caller's workspace budget): one parallel region over
// score tiles (the block's rows against a few whole images) makes the block's scores a, kept
// in one B x M*L buffer, and each tile's row statistics (nce_cpu_epilogue.h's
// tile_statistics); the rows' totals are merged in tile order, which
// gives the block's losses and backward factors exactly; a second region over fixed groups of
// tiles overwrites each tile with g = scale * d(objective)/da (gradient_tile) and makes
//   d trg[tile's images] += g^T @ src_block   (the tile owns those rows; blocks in order)
//   d src partial[group]  = sum over its tiles of g @ trg_tile
// and the groups' partials are added in group order. A partial is summed in a B x D scratch of
// the thread that runs its group, then kept in the group's own tiles, whose G it has used,
// until that sum (in a buffer of its own where a group spans fewer than D columns): the
// workspace is the block, a scratch per thread and the tiles' row statistics. Three products in all, float32
// throughout; tiles, groups and blocks are fixed by the problem and the budget, so the result
// does not depend on the thread count.
#include <torch/library.h>

#include "nce_cpu_tiles.h"

namespace amdim_kernels {

using at::Tensor;
using namespace cpu;

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> nce_fwd_grad_cpu(
    const Tensor& src, const Tensor& trg, const Tensor& pos_idx, std::optional<double> tclip_opt, double scale,
    double reg_weight, at::IntArrayRef group_rows, int64_t block_rows, bool need_src, bool need_trg) {
  check_inputs(src, trg, pos_idx, at::kCPU);
  const NoAutocast no_autocast;  // the op computes in float32 itself; its inner matmuls must not be autocast
  const int64_t N = src.size(0), M = trg.size(0), L = trg.size(1), D = src.size(1);
  check_fwd_grad_args(N, group_rows, block_rows);
  const int64_t B = std::min(N, block_rows);
  const float tclip = kernel_tclip(tclip_opt);
  const auto f32 = src.options().dtype(at::kFloat);
  const auto d64 = src.options().dtype(at::kDouble);
  Tensor loss = at::empty({N, L}, f32), pos = at::empty({N, L}, f32);
  Tensor neg_lse = at::empty({N}, f32), sq = at::empty({N}, f32);
  Tensor sq64 = at::empty({N}, d64);  // the rows' sums of a^2 in float64 (reg's range)
  Tensor dsrc = at::empty({need_src ? N : 0, D}, f32);
  Tensor dtrg = at::empty({need_trg ? M : 0, L, D}, f32);
  const TileOperands ops(src, pos_idx, B, M, L, kBlockTileElems);
  const Tensor& src_f = ops.src_f;
  const int64_t* p_idx = ops.pos_idx;
  const int64_t ipt = ops.images, tiles = ops.tiles;
  // d src's partial sums: a fixed number of groups of consecutive tiles, enough to keep up to
  // kMinGroups cores busy (each group's partial is a B x D float32 matrix)
  const int64_t groups = std::min(tiles, kMinGroups);
  auto group_tiles = [&](int64_t group) {
    return std::make_pair(group * tiles / groups, (group + 1) * tiles / groups);
  };
  // the partials in the groups' own tiles where each group spans at least D columns
  bool in_tiles = true;
  for (int64_t group = 0; group < groups; ++group) {
    const auto [t_begin, t_end] = group_tiles(group);
    in_tiles = in_tiles && (std::min(M, t_end * ipt) - t_begin * ipt) * L >= D;
  }
  // the block's scores, tile t at offset t * B * ipt * L as a (rows x its columns) matrix
  Tensor block = at::empty({B * M * L}, f32);
  Tensor tile_shift = at::empty({tiles, B}, f32), tile_sum = at::empty({tiles, B}, d64);
  Tensor tile_sq = at::empty({tiles, B}, d64);
  Tensor group_dsrc = at::empty({need_src && !in_tiles ? groups : 0, B, D}, f32);
  // the objective's upstream: 1/(N*L) on each positive's loss, reg_weight/(N*M*L) on each a^2
  const Tensor ones = at::ones({1}, f32);
  const Upstream unit{ones.expand({N, L}), 1.0 / (static_cast<double>(N) * L), ones.expand({N}),
                      reg_weight / (static_cast<double>(N) * M * L)};
  for (int64_t i0 = 0; i0 < N; i0 += B) {
    const int64_t R = std::min(B, N - i0);  // the block's rows
    const Tensor src_block = src_f.narrow(0, i0, R);
    const int64_t* block_idx = p_idx + i0;
    auto tile_of = [&](int64_t t, int64_t m0, int64_t m1) {
      return block.narrow(0, t * R * ipt * L, R * (m1 - m0) * L).view({R, (m1 - m0) * L});
    };
    float* pos_block = pos.data_ptr<float>() + i0 * L;
    auto partial_of = [&](int64_t group) {  // the group's d src partial, R x D
      return in_tiles ? block.narrow(0, group_tiles(group).first * R * ipt * L, R * D).view({R, D})
                      : group_dsrc[group].narrow(0, 0, R);
    };
    for_each_part(tiles, [&](int64_t t_begin, int64_t t_end) {
      for (int64_t t = t_begin; t < t_end; ++t) {
        const int64_t m0 = t * ipt, m1 = std::min(M, m0 + ipt);
        Tensor a = tile_of(t, m0, m1);
        scores_out(a, src_block, target_cols(trg, m0, m1), scale);  // kept
        tile_statistics(a.data_ptr<float>(), R, a.size(1), m0, m1, L, block_idx, tclip, pos_block,
                        tile_shift[t].data_ptr<float>(), tile_sum[t].data_ptr<double>(),
                        tile_sq[t].data_ptr<double>());
      }
    });
    const RowTotals totals =
        merge_tiles(tile_shift.narrow(1, 0, R), tile_sum.narrow(1, 0, R), tile_sq.narrow(1, 0, R));
    finish_rows(totals, pos_block, R, L, neg_lse.data_ptr<float>() + i0, loss.data_ptr<float>() + i0 * L);
    sq64.narrow(0, i0, R).copy_(totals.sq);
    if (!need_src && !need_trg) continue;
    const BackwardRows rows =
        backward_rows(pos.narrow(0, i0, R), neg_lse.narrow(0, i0, R),
                      {unit.grad_loss.narrow(0, 0, R), unit.loss_weight, unit.grad_sq.narrow(0, 0, R), unit.sq_weight},
                      scale);
    for_each_part(groups, [&](int64_t g_begin, int64_t g_end) {
      const Tensor scratch = need_src && in_tiles ? at::empty({R, D}, f32) : Tensor();
      for (int64_t group = g_begin; group < g_end; ++group) {
        const auto [t_begin, t_end] = group_tiles(group);
        Tensor acc = !need_src ? Tensor() : in_tiles ? scratch : partial_of(group);
        for (int64_t t = t_begin; t < t_end; ++t) {
          const int64_t m0 = t * ipt, m1 = std::min(M, m0 + ipt);
          Tensor g = tile_of(t, m0, m1);
          gradient_tile(g, m0, m1, L, block_idx, rows, tclip);
          if (need_trg) {  // the tile's images' rows of d trg, blocks added in order
            Tensor rows_out = dtrg.narrow(0, m0, m1 - m0).view({-1, D});
            if (i0 == 0) {
              at::mm_out(rows_out, g.t(), src_block);
            } else {
              rows_out.addmm_(g.t(), src_block);
            }
          }
          if (need_src) {  // float32, tiles in order within the group
            const Tensor cols = target_cols(trg, m0, m1);
            if (t == t_begin) {
              at::mm_out(acc, g, cols.t());
            } else {
              acc.addmm_(g, cols.t());
            }
          }
        }
        if (need_src && in_tiles) partial_of(group).copy_(scratch);  // its tiles are used
      }
    });
    if (need_src) {  // the block's d src: the groups' sums in group order
      Tensor out = dsrc.narrow(0, i0, R);
      out.copy_(partial_of(0));
      for (int64_t group = 1; group < groups; ++group) out.add_(partial_of(group));
    }
  }
  sq.copy_(sq64);
  return {loss, pos, neg_lse, sq, group_means(loss, group_rows), regulariser(sq64, M, L, reg_weight, f32), dsrc, dtrg};
}

TORCH_LIBRARY_IMPL(amdim_kernels, CPU, m) { m.impl("nce_fwd_grad", &nce_fwd_grad_cpu); }

}  // namespace amdim_kernels
