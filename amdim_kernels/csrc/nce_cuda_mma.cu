// Fused tensor-core kernels of the NCE loss for float16 and bfloat16 inputs (docs/loss.md).
//
// Each block computes one (64 x 128) tile of raw scores src_rows @ trg_cols^T on the tensor
// cores (WMMA 16x16x16, float32 accumulators) with a K-loop over D whose operand slabs are
// double-buffered in shared memory by cp.async; the accumulators then go to shared memory,
// where the epilogue reads them: the forward folds them into per-row partial statistics, the
// backward turns them into G. Scores never reach global memory.
//
//   forward:  grid (row blocks, splits); a block walks its split's column tiles in order and
//             keeps, per row, sum a^2 and the negatives' sum of exp(s - shift) (shift = tclip
//             with clipping up to tclip = 40, else a running maximum per lane); the positives
//             are written out.
//             nce_merge_kernel (nce_cuda_kernels.cu) folds the splits in a fixed order.
//   backward: grid (row blocks, column tiles of one chunk); G = scale * d(loss + reg)/da.
//
// Warp layout of the product: 8 warps as 2 (rows) x 4 (columns), 32 x 32 scores each. In the
// epilogue warp w owns tile rows 8w .. 8w+7, lane l columns l, l + 32, l + 64, l + 96
// (consecutive lanes read consecutive floats: no bank conflicts).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cmath>
#include <cstdint>

#include "nce_cuda_device.cuh"
#include "nce_cuda_kernels.h"
#include "nce_math.h"

// The device code needs compute capability 8.0 (bfloat16 WMMA, cp.async). Built for an older
// target, the kernels are stubs that trap, and nce_cuda.cpp refuses the path on such a GPU.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define AMDIM_MMA_ARCH 1
#else
#define AMDIM_MMA_ARCH 0
#endif

namespace amdim_kernels {
namespace {

using namespace nvcuda;

constexpr int BM = static_cast<int>(kMmaRows);  // 64 source rows per tile
constexpr int BN = static_cast<int>(kMmaCols);  // 128 target columns per tile
constexpr int BK = 32;                          // features per K-step
constexpr int LDS = BK + 8;   // operand row in shared memory: +16 bytes spreads rows over the banks;
                              // WMMA needs a multiple of 8 elements
constexpr int LDC = BN + 4;   // float score row: WMMA needs a multiple of 4
constexpr int kThreads = 256;
constexpr int kRowsPerWarp = BM / (kThreads / 32);  // 8
constexpr int kColsPerLane = BN / 32;               // 4

template <typename T>
struct Stage {  // one K-slab of both operands, row-major [row][k]
  T a[BM * LDS];
  T b[BN * LDS];
};
// The float score tile reuses the operand buffers once the K-loop is done.
constexpr int kStageBytes = static_cast<int>(sizeof(Stage<__half>));
constexpr int kSmemBytes = 2 * kStageBytes > BM * LDC * 4 ? 2 * kStageBytes : BM * LDC * 4;  // 33 KiB

#if AMDIM_MMA_ARCH
// 16 bytes global -> shared without registers; src_bytes = 0 writes zeros (masked rows).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int Pending>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory"); }

// torch builds with __CUDA_NO_HALF_CONVERSIONS__: no T(0.f)
template <typename T>
__device__ __forceinline__ T zero();
template <>
__device__ __forceinline__ __half zero<__half>() { return __float2half(0.f); }
template <>
__device__ __forceinline__ __nv_bfloat16 zero<__nv_bfloat16>() { return __float2bfloat16(0.f); }

// Eight consecutive features k, k+1, ... of one operand row into shared memory, zeros where the
// row is masked or k + e >= D. VEC: 16-byte aligned with D % 8 == 0 (host-checked), so a group
// of eight is wholly in or out; else element by element.
template <typename T, bool VEC>
__device__ __forceinline__ void load8(T* smem, const T* row_ptr, int64_t k, bool row_ok, int64_t D) {
  if constexpr (VEC) {
    const bool ok = row_ok && k < D;
    cp_async16(smem, ok ? row_ptr + k : row_ptr, ok);
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) smem[e] = row_ok && k + e < D ? row_ptr[k + e] : zero<T>();
  }
}

// Raw scores of source rows [row0, row0 + BM) against view columns [col0, col0 + BN), left as
// a float (BM x LDC) tile at the start of smem; masked rows and columns hold 0.
template <typename T, bool VEC>
__device__ void score_tile(const T* __restrict__ src, int64_t N, int64_t D, const T* __restrict__ trg,
                           const TargetView& v, int64_t row0, int64_t col0, unsigned char* smem) {
  Stage<T>* stage = reinterpret_cast<Stage<T>*>(smem);
  // Loader mapping, fixed over the K-loop: thread t copies features kg .. kg+7 of operand row
  // t / 4 (A: one of 64 rows; B: that row and the one 64 below, 128 rows).
  const int t = threadIdx.x, lr = t / 4, kg = (t % 4) * 8;
  const bool a_ok = row0 + lr < N;
  const T* a_row = src + (a_ok ? (row0 + lr) * D : 0);  // int64: rows * D can pass 2^31
  const T* b_row[2];
  bool b_ok[2];
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    const int64_t j = col0 + lr + 64 * q;
    b_ok[q] = j < v.C;
    const int64_t img = b_ok[q] ? j / v.L : 0, loc = b_ok[q] ? j - img * v.L : 0;
    b_row[q] = trg + img * v.stride_img + loc * v.stride_loc;
  }
  auto load_slab = [&](int64_t kt, int buf) {
    const int64_t k = kt * BK + kg;
    load8<T, VEC>(stage[buf].a + lr * LDS + kg, a_row, k, a_ok, D);
#pragma unroll
    for (int q = 0; q < 2; ++q) load8<T, VEC>(stage[buf].b + (lr + 64 * q) * LDS + kg, b_row[q], k, b_ok[q], D);
    cp_async_commit();
  };

  const int warp = t / 32, wm = warp / 4, wn = warp % 4;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  const int64_t nk = (D + BK - 1) / BK;
  load_slab(0, 0);
  for (int64_t kt = 0; kt < nk; ++kt) {
    if (kt + 1 < nk) {  // the next slab streams in while this one is multiplied
      load_slab(kt + 1, static_cast<int>((kt + 1) & 1));
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const Stage<T>& s = stage[kt & 1];
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      // B = trg_cols^T (K x columns) is column-major in the [column][k] buffer
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], s.a + (wm * 32 + i * 16) * LDS + kk, LDS);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], s.b + (wn * 32 + j * 16) * LDS + kk, LDS);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();  // all warps are done with this buffer: the next step refills it, or it becomes the score tile
  }
  float* cs = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(cs + (wm * 32 + i * 16) * LDC + wn * 32 + j * 16, acc[i][j], LDC, wmma::mem_row_major);
  __syncthreads();
}

#endif  // AMDIM_MMA_ARCH

template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads) nce_fwd_mma_kernel(
    const T* __restrict__ src, int64_t N, int64_t D, const TargetView v, int64_t tiles_per_split,
    const int64_t* __restrict__ pos_idx, float scale, float tclip, float* __restrict__ pos,
    float* __restrict__ part_sum, float* __restrict__ part_max, float* __restrict__ part_sq, int64_t split_base) {
#if AMDIM_MMA_ARCH
  __shared__ __align__(128) unsigned char smem[kSmemBytes];
  const float* cs = reinterpret_cast<const float*>(smem);
  const T* trg = static_cast<const T*>(v.trg);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t tiles = (v.C + BN - 1) / BN;
  const int64_t tile_begin = blockIdx.y * tiles_per_split;
  const int64_t tile_end = tile_begin + tiles_per_split < tiles ? tile_begin + tiles_per_split : tiles;

  // per row this lane has seen: sum a^2, the negatives' sum of exp(s - mx), and mx (tclip
  // where shift_by_tclip, nce_math.h; else the lane's running maximum)
  const bool fixed_shift = shift_by_tclip(tclip);
  float sq[kRowsPerWarp], sum[kRowsPerWarp], mx[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    sq[r] = 0.f;
    sum[r] = 0.f;
    mx[r] = fixed_shift ? tclip : -INFINITY;
  }
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t col0 = tile * BN;
    score_tile<T, VEC>(src, N, D, trg, v, row0, col0, smem);
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int64_t row = row0 + warp * kRowsPerWarp + r;
      if (row >= N) continue;  // warp-uniform
      const int64_t p = pos_idx[row];  // re-read per tile (cached) rather than held in 16 registers
#pragma unroll
      for (int q = 0; q < kColsPerLane; ++q) {
        const int64_t j = col0 + lane + 32 * q;
        if (j >= v.C) continue;
        const float a = scale * cs[(warp * kRowsPerWarp + r) * LDC + lane + 32 * q];
        sq[r] += square_or_nan(a);
        const float s = soft_clip(a, tclip);
        const int64_t img = v.m0 + j / v.L;
        if (img == p) {  // each positive lies in exactly one tile of one split: a plain store
          pos[row * v.L + (j - (img - v.m0) * v.L)] = s;
        } else if (fixed_shift) {
          sum[r] += expf(s - tclip);
        } else if (s > mx[r]) {  // online log-sum-exp; NaN fails the test and poisons sum below
          sum[r] = sum[r] * expf(mx[r] - s) + 1.f;
          mx[r] = s;
        } else {
          sum[r] += expf(s - mx[r]);
        }
      }
    }
    __syncthreads();  // the next tile's operands overwrite the score tile
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t row = row0 + warp * kRowsPerWarp + r;
    if (row >= N) continue;
    const float row_sq = warp_sum(sq[r]);
    const float shift = fixed_shift ? tclip : warp_max(mx[r]);
    // rescale each lane's sum to the common shift; a lane without negatives holds sum 0 and
    // mx -inf, which must not become exp(-inf - -inf) = NaN
    const float lane_sum = mx[r] == -INFINITY ? 0.f : sum[r] * expf(mx[r] - shift);
    const float row_sum = warp_sum(lane_sum);
    if (lane == 0) {
      const int64_t out = (split_base + blockIdx.y) * N + row;
      part_sum[out] = row_sum;
      part_max[out] = shift;
      part_sq[out] = row_sq;
    }
  }
#else
  __trap();
#endif
}

// G in the inputs' type T (float16 times *g_scale)
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads) nce_grad_mma_kernel(
    const T* __restrict__ src, int64_t N, int64_t D, const TargetView v, const int64_t* __restrict__ pos_idx,
    const float* __restrict__ gpos, const float* __restrict__ r_coef, const float* __restrict__ neg_lse,
    const float* __restrict__ reg_coef, float scale, float tclip, T* __restrict__ g, int64_t ldg,
    const float* __restrict__ g_scale) {
#if AMDIM_MMA_ARCH
  __shared__ __align__(128) unsigned char smem[kSmemBytes];
  const float* cs = reinterpret_cast<const float*>(smem);
  const float gs = grad_scale_of(g_scale);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM, col0 = static_cast<int64_t>(blockIdx.y) * BN;
  score_tile<T, VEC>(src, N, D, static_cast<const T*>(v.trg), v, row0, col0, smem);
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t row = row0 + warp * kRowsPerWarp + r;
    if (row >= N) continue;
    const int64_t p = pos_idx[row];
    const float lse = neg_lse[row], ri = r_coef[row], ci = reg_coef[row];
#pragma unroll
    for (int q = 0; q < kColsPerLane; ++q) {
      const int64_t j = col0 + lane + 32 * q;
      if (j >= v.C) continue;
      const float a = scale * cs[(warp * kRowsPerWarp + r) * LDC + lane + 32 * q];
      const float s = soft_clip(a, tclip);
      const int64_t img = v.m0 + j / v.L;
      // exp(s - neg_lse) <= 1 at every negative: the row's log-sum-exp bounds each term
      const float dl_ds = img == p ? gpos[row * v.L + (j - (img - v.m0) * v.L)] : ri * expf(s - lse);
      store_as(g + row * ldg + j, gs * score_grad(a, s, dl_ds, ci, tclip, scale));
    }
  }
#else
  __trap();
#endif
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// 16-byte copies need D % 8 == 0 and every row start 16-byte aligned.
bool vector_loads(const void* src, int64_t D, const TargetView& v) {
  return D % 8 == 0 && aligned16(src) && aligned16(v.trg) && v.stride_img % 8 == 0 && v.stride_loc % 8 == 0;
}

template <typename T, bool VEC>
void fwd(const void* src, int64_t N, int64_t D, const TargetView& v, const int64_t* pos_idx, float scale,
         float tclip, MmaSplit split, float* pos, float* part_sum, float* part_max, float* part_sq,
         int64_t split_base, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((N + BM - 1) / BM), static_cast<unsigned>(split.splits));
  nce_fwd_mma_kernel<T, VEC><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(src), N, D, v,
                                                            split.tiles_per_split, pos_idx, scale, tclip, pos,
                                                            part_sum, part_max, part_sq, split_base);
}

template <typename T, bool VEC>
void grad(const void* src, int64_t N, int64_t D, const TargetView& v, const int64_t* pos_idx, const float* gpos,
          const float* r, const float* neg_lse, const float* reg_coef, float scale, float tclip, void* g, int64_t ldg,
          const float* g_scale, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((N + BM - 1) / BM), static_cast<unsigned>((v.C + BN - 1) / BN));
  nce_grad_mma_kernel<T, VEC><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(src), N, D, v, pos_idx,
                                                             gpos, r, neg_lse, reg_coef, scale, tclip,
                                                             static_cast<T*>(g), ldg, g_scale);
}

}  // namespace

cudaError_t launch_nce_fwd_mma(const void* src, int64_t N, int64_t D, const TargetView& view, bool is_bf16,
                               const int64_t* pos_idx, float scale, float tclip, MmaSplit split, float* pos,
                               float* part_sum, float* part_max, float* part_sq, int64_t split_base,
                               cudaStream_t stream) {
  const bool vec = vector_loads(src, D, view);
  auto* launch = is_bf16 ? (vec ? fwd<__nv_bfloat16, true> : fwd<__nv_bfloat16, false>)
                         : (vec ? fwd<__half, true> : fwd<__half, false>);
  launch(src, N, D, view, pos_idx, scale, tclip, split, pos, part_sum, part_max, part_sq, split_base, stream);
  return cudaGetLastError();
}

cudaError_t launch_nce_grad_mma(const void* src, int64_t N, int64_t D, const TargetView& view, bool is_bf16,
                                const int64_t* pos_idx, const float* gpos, const float* r, const float* neg_lse,
                                const float* reg_coef, float scale, float tclip, void* g, int64_t ldg,
                                const float* g_scale, cudaStream_t stream) {
  // G has the inputs' dtype: bfloat16 keeps float32's range, float16 comes scaled (g_scale)
  const bool vec = vector_loads(src, D, view);
  auto* launch = is_bf16 ? (vec ? grad<__nv_bfloat16, true> : grad<__nv_bfloat16, false>)
                         : (vec ? grad<__half, true> : grad<__half, false>);
  launch(src, N, D, view, pos_idx, gpos, r, neg_lse, reg_coef, scale, tclip, g, ldg, g_scale, stream);
  return cudaGetLastError();
}

}  // namespace amdim_kernels
