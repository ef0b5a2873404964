// y[M, N] = x[M, K] @ W[N, K]^T (+ bias) for prefill-sized M (17..128 rows) with bf16 weights.
//
// Why: CPUs without AMX multiply bf16 matrices slowly (oneDNN's AVX512-BF16 GEMM runs at about half of MKL's
// fp32 one), so bf16 prefill used to widen each weight to an fp32 copy block by block and call MKL: a write and
// a re-read of 2x the weight's bytes per call. Here no copy leaves L1:
//   * threads split W's rows; each walks its block 4 rows (a "group") at a time, in W's stored layout;
//   * a group's K block is widened to fp32 once and meets every row of x before the next one (W is read from
//     memory once), while the next group's rows are prefetched into L2, a share per tile;
//   * a tile is 6 rows of x by the group's 4 rows: 24 zmm accumulators of 16-lane partial dot products along
//     K, reduced together into 4 adjacent outputs per x row at the end of a K block;
//   * K is cut into blocks of <= 1024 so a tile's x and W slices (6 + 4 rows) stay in the 48 KB L1;
//   * all sums are fp32, rounded to the output dtype once: a bf16 GEMM's arithmetic (only the order differs).
// Measured on the 2-core AVX-512 machine: 1.26-1.28x the widen-and-MKL path at 64-107 rows, 0.84x at 256 (x no
// longer stays in L2 beside the prefetched weights), so callers stop at 128 rows. fp32 weights work too, but
// MKL's packed-panel sgemm is as fast or faster on them (195-214 vs 216 GFLOP/s at 107 rows): fp32 stays there.
// AVX-512 only: elsewhere the op refuses (isa() says so) and callers keep their path.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "bf16.h"
#include "check.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)

constexpr int kTileRows = 6;   // rows of x per tile
constexpr int kGroup = 4;      // rows of W per group
constexpr int64_t kMaxBlock = 1024;  // K block: (6 + 4) x 1024 x 4 B = 40 KB of L1

// out[c * ldo + r] (+)= dot(x[c], w[r]) over k < len, for C rows of x and R rows of W (R == 4 or 1).
// The last partial vector of K is read with a mask (zeros beyond len).
template <int C, int R>
inline void tile(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t len, float* out, int64_t ldo,
                 bool accumulate) {
  __m512 acc[C][R];
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[c][r] = _mm512_setzero_ps();
  const int64_t whole = len - len % 16;
  for (int64_t k = 0; k < whole; k += 16) {
    __m512 wv[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_ps(w + r * ldw + k);
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      const __m512 xv = _mm512_loadu_ps(x + c * ldx + k);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[c][r] = _mm512_fmadd_ps(wv[r], xv, acc[c][r]);
    }
  }
  if (whole < len) {  // the last partial vector of K, zeros beyond len
    const __mmask16 mask = static_cast<__mmask16>((1u << (len - whole)) - 1);
    __m512 wv[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_ps(mask, w + r * ldw + whole);
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      const __m512 xv = _mm512_maskz_loadu_ps(mask, x + c * ldx + whole);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[c][r] = _mm512_fmadd_ps(wv[r], xv, acc[c][r]);
    }
  }
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) {
    if constexpr (R == 4) {
      // 4 dot products at once: halve each accumulator, then two rounds of pairwise horizontal adds
      __m256 h[4];
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r)
        h[r] = _mm256_add_ps(_mm512_castps512_ps256(acc[c][r]),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[c][r]), 1)));
      const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
      __m128 sums = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
      if (accumulate) sums = _mm_add_ps(sums, _mm_loadu_ps(out + c * ldo));
      _mm_storeu_ps(out + c * ldo, sums);
    } else {
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const float s = _mm512_reduce_add_ps(acc[c][r]);
        out[c * ldo + r] = accumulate ? out[c * ldo + r] + s : s;
      }
    }
  }
}

template <int R>
inline void tile_rows(int c, const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t len, float* out,
                      int64_t ldo, bool accumulate) {
  static_assert(kTileRows == 6, "dispatch below covers 1..6 rows of x");
  switch (c) {
    case 1: tile<1, R>(x, ldx, w, ldw, len, out, ldo, accumulate); break;
    case 2: tile<2, R>(x, ldx, w, ldw, len, out, ldo, accumulate); break;
    case 3: tile<3, R>(x, ldx, w, ldw, len, out, ldo, accumulate); break;
    case 4: tile<4, R>(x, ldx, w, ldw, len, out, ldo, accumulate); break;
    case 5: tile<5, R>(x, ldx, w, ldw, len, out, ldo, accumulate); break;
    default: tile<6, R>(x, ldx, w, ldw, len, out, ldo, accumulate); break;
  }
}

inline void widen(const uint16_t* src, float* dst, int64_t n) {  // bf16 -> fp32 (bf16.h)
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, idefics2_kernels::load16(src + i));
  for (; i < n; ++i) dst[i] = idefics2_kernels::bf16_to_float(src[i]);
}

inline void store_row(float* dst, const float* src, const float* bias, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i] + (bias ? bias[i] : 0.f);
}
inline void store_row(c10::BFloat16* dst, const float* src, const float* bias, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::BFloat16(src[i] + (bias ? bias[i] : 0.f));
}

// Rows [n0, n1) of y (all M rows of x), W rows in groups of 4 with the next group prefetched.
template <typename WT, typename OT>
void gemm_range(const float* x, int64_t M, int64_t K, const WT* w, const float* bias, OT* y, int64_t N, int64_t n0,
                int64_t n1) {
  const int64_t blocks = (K + kMaxBlock - 1) / kMaxBlock;
  const int64_t block = ((K + blocks - 1) / blocks + 15) / 16 * 16;
  const int64_t tiles = (M + kTileRows - 1) / kTileRows;
  // sums [M][4] of the current group (fp32, before bias and rounding); bf16 weights: the group's widened block
  std::vector<float> sums(static_cast<size_t>(M * kGroup));
  std::vector<float> wide(std::is_same_v<WT, float> ? 0 : static_cast<size_t>(kGroup * block));
  for (int64_t n = n0; n < n1; n += kGroup) {
    const int rows = static_cast<int>(std::min<int64_t>(kGroup, n1 - n));
    // the next group's bytes, a share per tile and K block, into L2 (the tiles keep L1 for themselves)
    const char* next = reinterpret_cast<const char*>(w + (n + kGroup) * K);
    const int64_t next_lines = n + kGroup < n1 ? (std::min<int64_t>(kGroup, n1 - n - kGroup) * K * sizeof(WT) + 63) / 64 : 0;
    const int64_t per_tile = (next_lines + tiles * blocks - 1) / (tiles * blocks);
    int64_t line = 0;
    for (int64_t k0 = 0; k0 < K; k0 += block) {
      const int64_t len = std::min(block, K - k0);
      const float* wb;
      int64_t ldw;
      if constexpr (std::is_same_v<WT, float>) {
        wb = w + n * K + k0;
        ldw = K;
      } else {
        for (int r = 0; r < rows; ++r) widen(w + (n + r) * K + k0, wide.data() + r * block, len);
        wb = wide.data();
        ldw = block;
      }
      for (int64_t m = 0; m < M; m += kTileRows) {
        for (const int64_t end = std::min(next_lines, line + per_tile); line < end; ++line)
          _mm_prefetch(next + 64 * line, _MM_HINT_T1);
        const int c = static_cast<int>(std::min<int64_t>(kTileRows, M - m));
        if (rows == kGroup) {
          tile_rows<kGroup>(c, x + m * K + k0, K, wb, ldw, len, sums.data() + m * kGroup, kGroup, k0 > 0);
        } else {
          for (int r = 0; r < rows; ++r)  // the last group of an N that is not a multiple of 4
            tile_rows<1>(c, x + m * K + k0, K, wb + r * ldw, ldw, len, sums.data() + m * kGroup + r, kGroup, k0 > 0);
        }
      }
    }
    for (int64_t m = 0; m < M; ++m)
      store_row(y + m * N + n, sums.data() + m * kGroup, bias ? bias + n : nullptr, rows);
  }
}

template <typename WT, typename OT>
void gemm(const float* x, int64_t M, int64_t K, const WT* w, const float* bias, OT* y, int64_t N) {
  const int64_t groups = (N + kGroup - 1) / kGroup;
  // a task of at least ~256 KB of weights: fewer wake-ups than groups, and long runs for the prefetcher
  const int64_t grain = std::max<int64_t>(1, (256 << 10) / std::max<int64_t>(1, kGroup * K * sizeof(WT)));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    gemm_range<WT, OT>(x, M, K, w, bias, y, N, g0 * kGroup, std::min(N, g1 * kGroup));
  });
}

#endif  // __AVX512F__

at::Tensor prefill_gemm(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(idefics2_kernels::kHaveAvx512, "prefill_gemm: built without AVX-512");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "prefill_gemm: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && weight.is_contiguous(),
              "prefill_gemm: x [M, K] and a contiguous weight [N, K]");
  TORCH_CHECK(weight.size(1) == x.size(1), "prefill_gemm: x and weight disagree on in_features");
  const auto wt = weight.scalar_type(), xt = x.scalar_type();
  TORCH_CHECK(wt == at::kFloat || wt == at::kBFloat16, "prefill_gemm: fp32 or bf16 weight");
  TORCH_CHECK(xt == wt || (xt == at::kFloat && wt == at::kBFloat16),
              "prefill_gemm: x must have the weight's dtype (or be fp32 with bf16 weight)");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return bias.has_value() && bias->defined() ? y.copy_(bias->expand({M, N})) : y.zero_();
  at::Tensor bf;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "prefill_gemm: bias must be [N]");
    bf = bias->to(at::kFloat).contiguous();
  }
#if defined(__AVX512F__)
  const at::Tensor xf = x.to(at::kFloat).contiguous();  // bf16 x: widened once (exact)
  const float* xp = xf.data_ptr<float>();
  const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;
  if (wt == at::kFloat) {
    gemm<float, float>(xp, M, K, weight.data_ptr<float>(), bp, y.data_ptr<float>(), N);
  } else {
    const auto* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr<c10::BFloat16>());
    if (xt == at::kFloat) gemm<uint16_t, float>(xp, M, K, wp, bp, y.data_ptr<float>(), N);
    else gemm<uint16_t, c10::BFloat16>(xp, M, K, wp, bp, y.data_ptr<c10::BFloat16>(), N);
  }
#endif
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(idefics2_kernels, m) {
  m.def("prefill_gemm(Tensor x, Tensor weight, Tensor? bias) -> Tensor", &prefill_gemm);
}
