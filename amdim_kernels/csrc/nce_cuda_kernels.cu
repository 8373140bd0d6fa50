// CUDA epilogue kernels of the NCE loss: cuBLAS computes a chunk of raw scores in float32
// (nce_cuda.cpp); these kernels reduce or transform it in one pass, so each chunk's scores
// are read once. Memory-bound by design: 256 threads per block, 8 columns per thread with
// consecutive threads on consecutive columns (coalesced), per-row block reductions.
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "nce_cuda_device.cuh"
#include "nce_cuda_kernels.h"
#include "nce_math.h"

namespace amdim_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = static_cast<int>(kCudaColsPerBlock / kThreads);  // 8

__device__ float block_sum(float v, float* shared) {
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // `shared` may still be read by a previous reduction
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  return warp_sum(lane < kThreads / 32 ? shared[lane] : 0.f);  // every thread holds the block's sum
}

__device__ float block_max(float v, float* shared) {
  v = warp_max(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  return warp_max(lane < kThreads / 32 ? shared[lane] : -INFINITY);
}

// grid (N, ceil(C / 2048)): block (row, y) reduces columns [y*2048, (y+1)*2048) of the chunk.
__global__ void __launch_bounds__(kThreads) nce_fwd_epilogue_kernel(
    const float* __restrict__ scores, int64_t ld, int64_t C, int64_t L, int64_t m0,
    const int64_t* __restrict__ pos_idx, float scale, float tclip, float* __restrict__ pos,
    float* __restrict__ part_sum, float* __restrict__ part_max, float* __restrict__ part_sq,
    int64_t split_base, int64_t N) {
  __shared__ float shared[kThreads / 32];
  const int64_t row = blockIdx.x;
  const int64_t p = pos_idx[row];
  const float* srow = scores + row * ld;  // int64: row * ld passes 2^31 for large chunks
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kCudaColsPerBlock;

  float s[kPerThread];
  bool neg[kPerThread];
  float sq = 0.f, local_max = -INFINITY;
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int64_t j = col0 + k * kThreads + threadIdx.x;  // consecutive threads, consecutive columns
    const bool in = j < C;
    const float a = in ? scale * srow[j] : 0.f;
    sq += square_or_nan(a);
    s[k] = soft_clip(a, tclip);
    const int64_t img = m0 + j / L;
    neg[k] = in && img != p;
    if (in && img == p) pos[row * L + (j - (img - m0) * L)] = s[k];
    if (neg[k]) local_max = fmaxf(local_max, s[k]);
  }
  // the shift: tclip where shift_by_tclip (nce_math.h), else the block's max
  const float shift = shift_by_tclip(tclip) ? tclip : block_max(local_max, shared);
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < kPerThread; ++k)
    if (neg[k]) sum += expf(s[k] - shift);
  sum = block_sum(sum, shared);
  sq = block_sum(sq, shared);
  if (threadIdx.x == 0) {
    const int64_t out = (split_base + blockIdx.y) * N + row;
    part_sum[out] = sum;
    part_max[out] = shift;
    part_sq[out] = sq;
  }
}

// one thread per row: fold the row's partials in split order (deterministic), then its L losses
__global__ void nce_merge_kernel(const float* __restrict__ part_sum, const float* __restrict__ part_max,
                                 const float* __restrict__ part_sq, int64_t splits, const float* __restrict__ pos,
                                 int64_t N, int64_t L, float* __restrict__ loss, float* __restrict__ neg_lse,
                                 float* __restrict__ sq_out) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= N) return;
  float shift = -INFINITY, sum = 0.f, sq = 0.f;
  for (int64_t k = 0; k < splits; ++k) {
    const float m = part_max[k * N + row], ps = part_sum[k * N + row];
    sq += part_sq[k * N + row];
    const float new_shift = fmaxf(shift, m);
    const float safe = new_shift == -INFINITY ? 0.f : new_shift;  // no exp(-inf - -inf)
    sum = sum * expf(shift - safe) + ps * expf(m - safe);
    shift = new_shift;
  }
  // -inf when the row has no negatives (M == 1); NaN where one of its scores is not finite
  const float lse = row_lse(shift + logf(sum), sq);
  neg_lse[row] = lse;
  sq_out[row] = sq;
  for (int64_t l = 0; l < L; ++l) loss[row * L + l] = positive_loss(pos[row * L + l], lse);
}

// One block: nce_loss's two scalars, the mean of the N*L losses and reg_c * sum_i sq[i].
// Thread t adds elements t, t + kThreads, ... in order, then one fixed tree adds the threads:
// deterministic.
__global__ void __launch_bounds__(kThreads) nce_totals_kernel(const float* __restrict__ loss,
                                                              const float* __restrict__ sq, int64_t N, int64_t L,
                                                              float inv_nl, float reg_c, float* __restrict__ mean,
                                                              float* __restrict__ reg) {
  __shared__ float shared[kThreads / 32];
  float acc = 0.f;
  for (int64_t k = threadIdx.x; k < N * L; k += kThreads) acc += loss[k];
  acc = block_sum(acc, shared);
  if (threadIdx.x == 0) *mean = acc * inv_nl;
  acc = 0.f;
  for (int64_t k = threadIdx.x; k < N; k += kThreads) acc += sq[k];
  acc = block_sum(acc, shared);
  // reg_c = 0 gives 0 where the sum of squares overflowed to +inf, NaN where it is NaN (a
  // poisoned row)
  if (threadIdx.x == 0) *reg = (reg_c == 0.f && acc == acc) ? 0.f : acc * reg_c;
}

// one thread per row, as the merge: the backward's per-row factors (nce_op.h's BackwardRows),
// from upstream gradients with any strides (0: one value broadcast), times their weights
__global__ void nce_grad_rows_kernel(const float* __restrict__ pos, UpstreamGrads up,
                                     const float* __restrict__ neg_lse, int64_t N, int64_t L,
                                     float* __restrict__ gpos, float* __restrict__ r, float* __restrict__ reg_coef) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= N) return;
  r[row] = grad_row(pos + row * L, up.grad_loss + row * up.stride_wn, up.stride_wl, up.loss_weight, neg_lse[row], L,
                    gpos + row * L);
  reg_coef[row] = 2.f * up.sq_weight * up.grad_sq[row * up.stride_sq];
}

template <typename G>
__global__ void __launch_bounds__(kThreads) nce_grad_epilogue_kernel(
    const float* __restrict__ scores, int64_t ld, int64_t C, int64_t L, int64_t m0,
    const int64_t* __restrict__ pos_idx, const float* __restrict__ gpos, const float* __restrict__ r,
    const float* __restrict__ neg_lse, const float* __restrict__ reg_coef, float scale, float tclip,
    G* __restrict__ g, int64_t ldg, const float* __restrict__ g_scale) {
  const int64_t row = blockIdx.x;
  const int64_t p = pos_idx[row];
  const float lse = neg_lse[row], ri = r[row], ci = reg_coef[row], gs = grad_scale_of(g_scale);
  const float* srow = scores + row * ld;
  G* grow = g + row * ldg;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kCudaColsPerBlock;
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int64_t j = col0 + k * kThreads + threadIdx.x;
    if (j >= C) break;
    const float a = scale * srow[j];
    const float s = soft_clip(a, tclip);
    const int64_t img = m0 + j / L;
    // exp(s - neg_lse) <= 1 at every negative: the row's log-sum-exp bounds each term
    const float dl_ds = img == p ? gpos[row * L + (j - (img - m0) * L)] : ri * expf(s - lse);
    store_as(grow + j, gs * score_grad(a, s, dl_ds, ci, tclip, scale));
  }
}

// One block: the power of two float16 G is stored times (nce_cuda_kernels.h).
__global__ void __launch_bounds__(kThreads) nce_grad_scale_kernel(
    const float* __restrict__ gpos, const float* __restrict__ r, const float* __restrict__ reg_coef,
    const float* __restrict__ sq, const float* __restrict__ col_l1, int64_t N, int64_t L, int64_t D, float scale,
    float* __restrict__ out) {
  __shared__ float shared[kThreads / 32];
  // A row whose bound is not finite is left out: a NaN row is a poisoned one (a non-finite
  // score, row_lse in nce_math.h), whose G is NaN at any scale, and an infinite one has an
  // infinite upstream gradient, which stays infinite at any scale; either would otherwise
  // take every other row's G to NaN or to 0. (b < INFINITY is false for NaN.)
  float bound = 0.f;
  for (int64_t row = threadIdx.x; row < N; row += kThreads) {
    float dl_ds = fabsf(r[row]);  // |dL/ds| at the row's negatives is at most |r|
    for (int64_t l = 0; l < L; ++l) dl_ds = fmaxf(dl_ds, fabsf(gpos[row * L + l]));
    const float b = scale * (dl_ds + fabsf(reg_coef[row]) * sqrtf(sq[row]));
    if (b < INFINITY) bound = fmaxf(bound, b);
  }
  bound = block_max(bound, shared);
  float growth = 1.f;  // d trg = G^T @ src grows |G| by at most max_d col_l1[d]
  if (col_l1 != nullptr) {
    // a non-finite column norm comes from a non-finite source, whose row is poisoned, and
    // then every column of d trg is NaN anyway: it must not rescale the other rows' G
    float c = 0.f;
    for (int64_t d = threadIdx.x; d < D; d += kThreads)
      if (col_l1[d] < INFINITY) c = fmaxf(c, col_l1[d]);
    growth = fmaxf(block_max(c, shared), 1.f);
  }
  if (threadIdx.x == 0) {
    // k = kScaleLog2Target - ceil(log2(total)), read exactly off total's float32 bits: its
    // exponent, plus one unless the mantissa is 0 (0 and subnormals give k >= 141, inf -113:
    // both clamped); 2^k and 2^-k are built from exponent bits, so both are exact
    const int bits = __float_as_int(bound * growth);
    const int ceil_log2 = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0 ? 1 : 0);
    const int k = max(-kScaleMaxExp, min(kScaleMaxExp, kScaleLog2Target - ceil_log2));
    out[0] = __int_as_float((k + 127) << 23);
    out[1] = __int_as_float((127 - k) << 23);
  }
}

dim3 chunk_grid(int64_t N, int64_t C) {
  return dim3(static_cast<unsigned>(N), static_cast<unsigned>((C + kCudaColsPerBlock - 1) / kCudaColsPerBlock));
}

}  // namespace

cudaError_t launch_nce_fwd_epilogue(const float* scores, int64_t ld, int64_t N, int64_t C, int64_t L, int64_t m0,
                                    const int64_t* pos_idx, float scale, float tclip, float* pos, float* part_sum,
                                    float* part_max, float* part_sq, int64_t split_base, cudaStream_t stream) {
  nce_fwd_epilogue_kernel<<<chunk_grid(N, C), kThreads, 0, stream>>>(
      scores, ld, C, L, m0, pos_idx, scale, tclip, pos, part_sum, part_max, part_sq, split_base, N);
  return cudaGetLastError();
}

cudaError_t nce_kernel_image_status() {
  cudaFuncAttributes attr;
  const cudaError_t err = cudaFuncGetAttributes(&attr, nce_merge_kernel);
  if (err != cudaSuccess) cudaGetLastError();  // not a sticky error: clear it for the caller's next check
  return err;
}

cudaError_t launch_nce_merge(const float* part_sum, const float* part_max, const float* part_sq, int64_t splits,
                             const float* pos, int64_t N, int64_t L, float* loss, float* neg_lse, float* sq,
                             cudaStream_t stream) {
  const int threads = 128;
  nce_merge_kernel<<<static_cast<unsigned>((N + threads - 1) / threads), threads, 0, stream>>>(
      part_sum, part_max, part_sq, splits, pos, N, L, loss, neg_lse, sq);
  return cudaGetLastError();
}

cudaError_t launch_nce_totals(const float* loss, const float* sq, int64_t N, int64_t L, float reg_c, float* mean,
                              float* reg, cudaStream_t stream) {
  nce_totals_kernel<<<1, kThreads, 0, stream>>>(loss, sq, N, L, 1.f / static_cast<float>(N * L), reg_c, mean, reg);
  return cudaGetLastError();
}

cudaError_t launch_nce_grad_rows(const float* pos, const UpstreamGrads& up, const float* neg_lse, int64_t N,
                                 int64_t L, float* gpos, float* r, float* reg_coef, cudaStream_t stream) {
  const int threads = 128;
  nce_grad_rows_kernel<<<static_cast<unsigned>((N + threads - 1) / threads), threads, 0, stream>>>(
      pos, up, neg_lse, N, L, gpos, r, reg_coef);
  return cudaGetLastError();
}

cudaError_t launch_nce_grad_scale(const float* gpos, const float* r, const float* reg_coef, const float* sq,
                                  const float* col_l1, int64_t N, int64_t L, int64_t D, float scale, float* out,
                                  cudaStream_t stream) {
  nce_grad_scale_kernel<<<1, kThreads, 0, stream>>>(gpos, r, reg_coef, sq, col_l1, N, L, D, scale, out);
  return cudaGetLastError();
}

namespace {
template <typename G>
void grad_epilogue(const float* scores, int64_t ld, int64_t N, int64_t C, int64_t L, int64_t m0,
                   const int64_t* pos_idx, const float* gpos, const float* r, const float* neg_lse,
                   const float* reg_coef, float scale, float tclip, void* g, int64_t ldg, const float* g_scale,
                   cudaStream_t stream) {
  nce_grad_epilogue_kernel<G><<<chunk_grid(N, C), kThreads, 0, stream>>>(
      scores, ld, C, L, m0, pos_idx, gpos, r, neg_lse, reg_coef, scale, tclip, static_cast<G*>(g), ldg, g_scale);
}
}  // namespace

cudaError_t launch_nce_grad_epilogue(const float* scores, int64_t ld, int64_t N, int64_t C, int64_t L, int64_t m0,
                                     const int64_t* pos_idx, const float* gpos, const float* r, const float* neg_lse,
                                     const float* reg_coef, float scale, float tclip, void* g, int64_t ldg,
                                     GradType g_type, const float* g_scale, cudaStream_t stream) {
  auto* launch = g_type == GradType::kBFloat16 ? grad_epilogue<__nv_bfloat16>
                 : g_type == GradType::kFloat16 ? grad_epilogue<__half>
                                                 : grad_epilogue<float>;
  launch(scores, ld, N, C, L, m0, pos_idx, gpos, r, neg_lse, reg_coef, scale, tclip, g, ldg, g_scale, stream);
  return cudaGetLastError();
}

}  // namespace amdim_kernels
