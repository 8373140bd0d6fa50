// The CPU kernels' epilogue: what each score tile's scores become, in one pass over the tile
// per direction, where a dozen ATen ops made a dozen (nce_cpu_epilogue.cpp).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace amdim_kernels {
namespace cpu {

// The forward's statistics of one (R x C) tile of raw scores a (row-major) of images [m0, m1),
// rows' positive images pos_idx[i]: per row i
//   sq[i]    the sum of square_or_nan(a) (nce_math.h) over the tile, in float64
//   shift[i] tclip where shift_by_tclip (nce_math.h), else the maximum of the negatives' s
//            (-inf where the tile holds none)
//   sum[i]   the negatives' sum of exp(s - shift), s = soft_clip(a)
// and each positive's s copied to pos_rows[i * L + l]. `a` is left as it is.
void tile_statistics(const float* a, int64_t R, int64_t C, int64_t m0, int64_t m1, int64_t L, const int64_t* pos_idx,
                     float tclip, float* pos_rows, float* shift, double* sum, double* sq);

// Overwrites the (R x C) tile of raw scores a with g = scale * d(objective)/da, from the rows'
// backward factors (nce_op.h's BackwardRows, which carry the scale): neg_lse, r, reg_coef (R,)
// and gpos (R x L):
//   g = reg_coef * a + dL/ds * ds/da,  dL/ds = r exp(s - neg_lse) at a negative, gpos at a
//   positive; ds/da = 1 - (s / tclip)^2 with clipping.
void tile_gradient(float* a, int64_t R, int64_t C, int64_t m0, int64_t m1, int64_t L, const int64_t* pos_idx,
                   float tclip, const float* neg_lse, const float* r, const float* reg_coef, const float* gpos);

// The entry points above run the best version compiled for this CPU: "avx512", "avx2" (with
// FMA) or "baseline". epilogue_versions() names those this CPU can run, best first; the
// *_version functions run a named one (a test compares each with float64 arithmetic).
std::vector<std::string> epilogue_versions();
void tile_statistics_version(const std::string& version, const float* a, int64_t R, int64_t C, int64_t m0, int64_t m1,
                             int64_t L, const int64_t* pos_idx, float tclip, float* pos_rows, float* shift,
                             double* sum, double* sq);
void tile_gradient_version(const std::string& version, float* a, int64_t R, int64_t C, int64_t m0, int64_t m1,
                           int64_t L, const int64_t* pos_idx, float tclip, const float* neg_lse, const float* r,
                           const float* reg_coef, const float* gpos);

}  // namespace cpu
}  // namespace amdim_kernels
