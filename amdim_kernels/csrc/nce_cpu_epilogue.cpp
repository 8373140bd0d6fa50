// The CPU epilogue (nce_cpu_epilogue.h): each tile row in one loop of plain float arithmetic
// that the compiler vectorises, with branch-free exp and tanh (below) in place of libm's
// calls, which do not vectorise. On x86-64 (GCC, Clang) each entry point is compiled three
// times, for AVX-512, for AVX2+FMA and for the baseline, and picks one by the CPU's features
// on first call. Sums run in 16 fixed lanes, added in lane order at the end, so that a row's
// result does not depend on the vector width (the compiler may not reorder a float sum itself):
// the AVX-512 and AVX2 versions give the same bits; the baseline, without FMA, differs from
// them in the last bits.
#include "nce_cpu_epilogue.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <vector>

#include "nce_math.h"

// Everything below the entry points is inlined into each version (a function left out of
// line would be compiled once, for the baseline).
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define AMDIM_AVX2_VERSION 1  // and AVX-512
#define AMDIM_AVX2 __attribute__((target("avx2,fma")))
#define AMDIM_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,fma,prefer-vector-width=512")))
#else
#define AMDIM_AVX2_VERSION 0
#endif
#if defined(__GNUC__) || defined(__clang__)
#define AMDIM_INLINE inline __attribute__((always_inline))
#else
#define AMDIM_INLINE inline
#endif

namespace amdim_kernels {
namespace cpu {
namespace {

constexpr int kLanes = 16;  // two AVX2 vectors or one AVX-512 vector of float32 a step
constexpr float kInf = std::numeric_limits<float>::infinity();

AMDIM_INLINE float from_bits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

AMDIM_INLINE int32_t to_bits(float f) {
  int32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

// exp(x) for x <= 0 (the forward's s - shift and the backward's s - neg_lse at the negatives),
// relative error about 1 ulp: x = n ln2 + r with |r| <= ln2/2, e^r = 1 + r + r^2 p(r) with p
// of degree 4 fitted for least maximum relative error on that interval (4e-9, far below
// float32's rounding), 2^n from the exponent bits. x below -87.3 (where e^x leaves float32's
// normal range) gives about 1e-38 instead of a subnormal or 0; NaN gives NaN. A positive x
// (the backward evaluates the positives' columns as negatives before overwriting them) gives
// a value of no use but no undefined behaviour: the bits are formed as unsigned integers.
AMDIM_INLINE float exp_nonpositive(float x) {
  x = x < -87.3f ? -87.3f : x;                 // NaN compares false and stays NaN
  const float magic = 12582912.f;              // 1.5 * 2^23: adding it rounds to an integer
  const float t = x * 1.44269504088896341f + magic;
  const float n = t - magic;                   // round(x / ln2), in [-126, 0] for x in [-87.3, 0]
  const uint32_t ni = static_cast<uint32_t>(to_bits(t)) - static_cast<uint32_t>(to_bits(magic));
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.3814610045e-3f;
  p = p * r + 8.3687101274e-3f;
  p = p * r + 4.1668387429e-2f;
  p = p * r + 1.6666520687e-1f;
  p = p * r + 4.9999993451e-1f;
  p = p * r * r + r + 1.f;
  return p * from_bits((ni + 127u) << 23);
}

// tanh(x) as x P(x^2) / Q(x^2), P and Q of degree 4 fitted for least maximum relative error on
// [0, 9] (5e-8 with the coefficients rounded to float32), on x clamped to [-9, 9] (1 - tanh(9)
// = 3e-8, below float32's spacing under 1), the result clamped to [-1, 1]. Error below 6 ulp in float32 on the whole range with FMA, 7
// without (the rounding of the float32 Horner sums dominates it); NaN gives NaN. Eight FMAs and a division (the
// epilogue's time is its FMAs); every coefficient positive, so Horner's sums never cancel.
AMDIM_INLINE float tanh_branch_free(float x) {
  x = x > 9.f ? 9.f : (x < -9.f ? -9.f : x);  // NaN compares false and stays NaN
  const float y = x * x;
  float p = 1.3352969087e-08f;
  p = p * y + 2.0607864690e-05f;
  p = p * y + 3.4955152624e-03f;
  p = p * y + 1.3380965041e-01f;
  p = p * y + 9.9999997964e-01f;
  float q = 7.7758652766e-07f;
  q = q * y + 3.2855146426e-04f;
  q = q * y + 2.5876707093e-02f;
  q = q * y + 4.6714280706e-01f;
  q = q * y + 1.f;
  const float u = x * p / q;
  return u > 1.f ? 1.f : (u < -1.f ? -1.f : u);  // so that |s| <= tclip and 1 - u^2 >= 0
}

// s = soft_clip(a) with inv = 1 / tclip (kClip false: s = a).
template <bool kClip>
AMDIM_INLINE float clipped(float a, float tclip, float inv) {
  return kClip ? tclip * tanh_branch_free(a * inv) : a;
}

// the larger of m and s, NaN where either is NaN (a select, without a branch)
AMDIM_INLINE float max_or_nan(float m, float s) { return ((s > m) | (s != s)) ? s : m; }

// sum over [begin, end) of exp(s - shift), in kLanes lanes
template <bool kClip>
AMDIM_INLINE float sum_exp(const float* a, int64_t begin, int64_t end, float tclip, float inv, float shift) {
  float acc[kLanes] = {};
  int64_t j = begin;
  for (; j + kLanes <= end; j += kLanes) {
    for (int k = 0; k < kLanes; ++k) acc[k] += exp_nonpositive(clipped<kClip>(a[j + k], tclip, inv) - shift);
  }
  for (int k = 0; j < end; ++j, ++k) acc[k] += exp_nonpositive(clipped<kClip>(a[j], tclip, inv) - shift);
  float total = 0.f;
  for (int k = 0; k < kLanes; ++k) total += acc[k];
  return total;
}

// max over [begin, end) of s, in kLanes lanes; NaN where one is NaN
template <bool kClip>
AMDIM_INLINE float max_clipped(const float* a, int64_t begin, int64_t end, float tclip, float inv) {
  float acc[kLanes];
  for (int k = 0; k < kLanes; ++k) acc[k] = -kInf;
  int64_t j = begin;
  for (; j + kLanes <= end; j += kLanes) {
    for (int k = 0; k < kLanes; ++k) acc[k] = max_or_nan(acc[k], clipped<kClip>(a[j + k], tclip, inv));
  }
  for (int k = 0; j < end; ++j, ++k) acc[k] = max_or_nan(acc[k], clipped<kClip>(a[j], tclip, inv));
  float m = -kInf;
  for (int k = 0; k < kLanes; ++k) m = max_or_nan(m, acc[k]);
  return m;
}

// the row's sum of square_or_nan(a), in float64 lanes (no float32 overflow)
AMDIM_INLINE double sum_squares(const float* a, int64_t C) {
  double acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= C; j += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const double v = a[j + k];
      acc[k] += v * v + (v - v);
    }
  }
  for (int k = 0; j < C; ++j, ++k) {
    const double v = a[j];
    acc[k] += v * v + (v - v);
  }
  double total = 0.0;
  for (int k = 0; k < kLanes; ++k) total += acc[k];
  return total;
}

// positives [p0, p1) of row i (p0 = p1 = C where its image is not in the tile)
AMDIM_INLINE void positive_columns(int64_t p, int64_t m0, int64_t m1, int64_t L, int64_t C, int64_t& p0, int64_t& p1) {
  p0 = (p >= m0 && p < m1) ? (p - m0) * L : C;
  p1 = p0 < C ? p0 + L : C;
}

template <bool kClip>
AMDIM_INLINE void statistics_rows(const float* a, int64_t R, int64_t C, int64_t m0, int64_t m1, int64_t L,
                                  const int64_t* pos_idx, float tclip, float* pos_rows, float* shift, double* sum,
                                  double* sq) {
  const float inv = kClip ? 1.f / tclip : 1.f;
  const bool fixed = shift_by_tclip(tclip);
  for (int64_t i = 0; i < R; ++i) {
    const float* row = a + i * C;
    int64_t p0, p1;  // the negatives: [0, p0) and [p1, C)
    positive_columns(pos_idx[i], m0, m1, L, C, p0, p1);
    for (int64_t j = p0; j < p1; ++j) pos_rows[i * L + (j - p0)] = clipped<kClip>(row[j], tclip, inv);
    sq[i] = sum_squares(row, C);
    float sh = tclip;
    if (!fixed) sh = max_or_nan(max_clipped<kClip>(row, 0, p0, tclip, inv), max_clipped<kClip>(row, p1, C, tclip, inv));
    shift[i] = sh;
    // no negatives here (sh = -inf): the sums are 0, and merge_tiles skips the tile's row
    const float safe = sh == -kInf ? 0.f : sh;
    sum[i] = static_cast<double>(sum_exp<kClip>(row, 0, p0, tclip, inv, safe)) +
             static_cast<double>(sum_exp<kClip>(row, p1, C, tclip, inv, safe));
  }
}

template <bool kClip>
AMDIM_INLINE void gradient_rows(float* a, int64_t R, int64_t C, int64_t m0, int64_t m1, int64_t L,
                                const int64_t* pos_idx, float tclip, const float* neg_lse, const float* r,
                                const float* reg_coef, const float* gpos) {
  const float inv = kClip ? 1.f / tclip : 1.f;
  std::vector<float> positives(static_cast<size_t>(L));
  for (int64_t i = 0; i < R; ++i) {
    float* row = a + i * C;
    const float lse = neg_lse[i], ri = r[i], reg = reg_coef[i];
    int64_t p0, p1;
    positive_columns(pos_idx[i], m0, m1, L, C, p0, p1);
    std::copy(row + p0, row + p1, positives.data());  // their raw scores, which the loop overwrites
    // every column as a negative: r exp(s - neg_lse), <= r since neg_lse bounds each negative
    for (int64_t j = 0; j < C; ++j) {
      const float x = row[j];
      if (kClip) {
        const float u = tanh_branch_free(x * inv);
        row[j] = reg * x + ri * exp_nonpositive(tclip * u - lse) * (1.f - u * u);
      } else {
        row[j] = reg * x + ri * exp_nonpositive(x - lse);
      }
    }
    for (int64_t j = p0; j < p1; ++j) {  // then the positives: gpos
      const float x = positives[j - p0];
      const float u = kClip ? tanh_branch_free(x * inv) : 0.f;
      row[j] = reg * x + gpos[i * L + (j - p0)] * (1.f - u * u);
    }
  }
}

// Each entry point's versions: the same code, compiled for AVX-512, AVX2+FMA and the baseline.
#define AMDIM_STATISTICS_BODY                                                                 \
  if (tclip > 0.f) {                                                                          \
    statistics_rows<true>(a, R, C, m0, m1, L, pos_idx, tclip, pos_rows, shift, sum, sq);      \
  } else {                                                                                    \
    statistics_rows<false>(a, R, C, m0, m1, L, pos_idx, tclip, pos_rows, shift, sum, sq);     \
  }
#define AMDIM_GRADIENT_BODY                                                                   \
  if (tclip > 0.f) {                                                                          \
    gradient_rows<true>(a, R, C, m0, m1, L, pos_idx, tclip, neg_lse, r, reg_coef, gpos);      \
  } else {                                                                                    \
    gradient_rows<false>(a, R, C, m0, m1, L, pos_idx, tclip, neg_lse, r, reg_coef, gpos);     \
  }

// statistics_<name> and gradient_<name>, compiled with the attributes `target` (empty: the
// baseline).
#define AMDIM_EPILOGUE_VERSION(name, target)                                                             \
  target void statistics_##name(const float* a, int64_t R, int64_t C, int64_t m0, int64_t m1, int64_t L,  \
                                const int64_t* pos_idx, float tclip, float* pos_rows, float* shift,       \
                                double* sum, double* sq) {                                                \
    AMDIM_STATISTICS_BODY                                                                                 \
  }                                                                                                       \
  target void gradient_##name(float* a, int64_t R, int64_t C, int64_t m0, int64_t m1, int64_t L,          \
                              const int64_t* pos_idx, float tclip, const float* neg_lse, const float* r,  \
                              const float* reg_coef, const float* gpos) {                                 \
    AMDIM_GRADIENT_BODY                                                                                   \
  }

AMDIM_EPILOGUE_VERSION(baseline, )
#if AMDIM_AVX2_VERSION
AMDIM_EPILOGUE_VERSION(avx2, AMDIM_AVX2)
AMDIM_EPILOGUE_VERSION(avx512, AMDIM_AVX512)
#endif

using StatisticsFn = void (*)(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, const int64_t*, float, float*,
                              float*, double*, double*);
using GradientFn = void (*)(float*, int64_t, int64_t, int64_t, int64_t, int64_t, const int64_t*, float, const float*,
                            const float*, const float*, const float*);

struct Version {
  const char* name;
  bool runs;  // this CPU has its instructions
  StatisticsFn statistics;
  GradientFn gradient;
};

// Every version compiled here, best first, with whether this CPU runs it (found once).
const std::vector<Version>& compiled_versions() {
  static const std::vector<Version> versions = {
#if AMDIM_AVX2_VERSION
      {"avx512",
       __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"),
       statistics_avx512, gradient_avx512},
      {"avx2", __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"), statistics_avx2, gradient_avx2},
#endif
      {"baseline", true, statistics_baseline, gradient_baseline},
  };
  return versions;
}

// The named version, where this CPU runs it.
const Version& version_named(const std::string& name) {
  for (const Version& v : compiled_versions()) {
    if (v.runs && name == v.name) return v;
  }
  throw std::invalid_argument("epilogue version " + name + " does not run here");
}

// The version the entry points run: the best this CPU has.
const Version& best_version() {
  static const Version& best = version_named(epilogue_versions().front());
  return best;
}

}  // namespace

std::vector<std::string> epilogue_versions() {
  std::vector<std::string> names;
  for (const Version& v : compiled_versions()) {
    if (v.runs) names.emplace_back(v.name);
  }
  return names;
}

void tile_statistics_version(const std::string& version, const float* a, int64_t R, int64_t C, int64_t m0, int64_t m1,
                             int64_t L, const int64_t* pos_idx, float tclip, float* pos_rows, float* shift,
                             double* sum, double* sq) {
  version_named(version).statistics(a, R, C, m0, m1, L, pos_idx, tclip, pos_rows, shift, sum, sq);
}

void tile_gradient_version(const std::string& version, float* a, int64_t R, int64_t C, int64_t m0, int64_t m1,
                           int64_t L, const int64_t* pos_idx, float tclip, const float* neg_lse, const float* r,
                           const float* reg_coef, const float* gpos) {
  version_named(version).gradient(a, R, C, m0, m1, L, pos_idx, tclip, neg_lse, r, reg_coef, gpos);
}

void tile_statistics(const float* a, int64_t R, int64_t C, int64_t m0, int64_t m1, int64_t L, const int64_t* pos_idx,
                     float tclip, float* pos_rows, float* shift, double* sum, double* sq) {
  best_version().statistics(a, R, C, m0, m1, L, pos_idx, tclip, pos_rows, shift, sum, sq);
}

void tile_gradient(float* a, int64_t R, int64_t C, int64_t m0, int64_t m1, int64_t L, const int64_t* pos_idx,
                   float tclip, const float* neg_lse, const float* r, const float* reg_coef, const float* gpos) {
  best_version().gradient(a, R, C, m0, m1, L, pos_idx, tclip, neg_lse, r, reg_coef, gpos);
}

}  // namespace cpu
}  // namespace amdim_kernels
