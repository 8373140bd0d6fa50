// Scalar math of the AMDIM NCE loss (docs/loss.md), shared by the CPU and CUDA kernels.
// No torch headers: this file is included by .cu files compiled with nvcc alone.
#pragma once

#include <cmath>
#include <cstdint>

#include "nce_shared.h"

#if defined(__CUDACC__)
#define NCE_HD __host__ __device__ __forceinline__
#else
#define NCE_HD inline
#endif

namespace amdim_kernels {

// tclip <= 0 encodes "no clipping" inside the kernels (Python validates tclip > 0 or None).
NCE_HD float soft_clip(float a, float tclip) {
  return tclip > 0.f ? tclip * tanhf(a / tclip) : a;
}

// The forward's shift of exp(s - shift): the constant tclip up to kMaxShiftTclip (nce_shared.h),
// else a running maximum.
NCE_HD bool shift_by_tclip(float tclip) { return tclip > 0.f && tclip <= kMaxShiftTclip; }

// d soft_clip / d a, written with the clipped score s: 1 - (s / tclip)^2.
NCE_HD float soft_clip_grad(float s, float tclip) {
  if (tclip <= 0.f) return 1.f;
  const float t = s / tclip;
  return 1.f - t * t;
}

// log(1 + exp(x)) without overflow; softplus(-inf) = 0.
NCE_HD float softplus(float x) {
  return fmaxf(x, 0.f) + log1pf(expf(-fabsf(x)));
}

// A score's term in its row's sum of squares: a * a exactly where a is finite (a - a = 0),
// NaN where a is +-inf or NaN (inf - inf). The row's sum is then NaN exactly when one of its
// scores is not finite, and +inf only where the squares of finite scores overflow float32;
// row_lse turns the first case into the row's poison.
NCE_HD float square_or_nan(float a) { return a * a + (a - a); }

// The row's neg_lse as the losses and the backward read it: NaN where one of the row's raw
// scores is not finite (row_sq NaN, square_or_nan), although tanh maps +-inf to a finite
// +-tclip. A NaN neg_lse makes each of the row's L losses NaN and, in the backward, every
// entry of the row's G (its sigmoids, R and exp(s - neg_lse) are NaN), and nothing else.
NCE_HD float row_lse(float neg_lse, float row_sq) { return row_sq != row_sq ? NAN : neg_lse; }

// Per-positive loss -nce = log(exp(pos) + exp(neg_lse)) - pos = softplus(neg_lse - pos).
NCE_HD float positive_loss(float pos, float neg_lse) { return softplus(neg_lse - pos); }

// 1 / (1 + exp(-x)): sigmoid(-inf) = 0 (a row with no negatives), NaN stays NaN.
NCE_HD float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// The backward's factors of one row (nce_op.h's BackwardRows) from its L positives' clipped
// scores pos, their upstream gradients w_weight * w[l * w_stride] (stride 0: one value for
// all) and the row's neg_lse: writes gpos[l] = -w sig and returns r = sum_l w sig, sig =
// sigmoid(neg_lse - pos), summed in l order (deterministic).
NCE_HD float grad_row(const float* pos, const float* w, int64_t w_stride, float w_weight, float neg_lse, int64_t L,
                      float* gpos) {
  float r = 0.f;
  for (int64_t l = 0; l < L; ++l) {
    const float w_sig = w_weight * w[l * w_stride] * sigmoid(neg_lse - pos[l]);
    gpos[l] = -w_sig;
    r += w_sig;
  }
  return r;
}

// G = scale * d(loss + reg)/da at one score. dl_ds is the loss gradient at the clipped score
// s (gpos at a positive, R * exp(s - neg_lse) at a negative); reg_coef * a is the
// regulariser's part.
NCE_HD float score_grad(float a, float s, float dl_ds, float reg_coef, float tclip, float scale) {
  return scale * (dl_ds * soft_clip_grad(s, tclip) + reg_coef * a);
}

}  // namespace amdim_kernels
