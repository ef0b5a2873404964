// y[B, N] = x[B, K] @ W[N, K]^T (+ bias) for small B (1..16), fp32 or bf16 weights.
//
// At small B a linear layer is bound by reading W from memory, so the kernel is built to stream W
// exactly once at close to memory bandwidth:
//   * threads split the output rows; each thread walks its own contiguous block of W rows;
//   * R weight rows are processed together (R sequential streams, R x BC independent accumulators);
//   * K is cut into blocks small enough that the R row slices and the x slice stay in L1: the first
//     batch chunk pulls the W slice from memory, the other batch chunks re-read it from L1;
//   * each row group prefetches the next group's rows as it goes: the hardware prefetcher alone stalls
//     at every jump from one group of short rows to the next;
//   * bf16 weights are widened to fp32 in registers (a bf16 is the top 16 bits of an fp32), and all
//     accumulation is fp32.
// Compiled with -march=native: an AVX-512 path, an AVX2 path, and a plain C++ fallback.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#include "bf16.h"
#include "rope.h"
#include "check.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int kMaxB = 16;
// K block when the batch takes several passes: R weight rows + up to 16 x rows of 256 floats = 20 KB,
// which stays in L1 between the passes.
constexpr int64_t kBlock = 256;

using idefics2_kernels::bf16_to_float;

inline float load_scalar(const float* p) { return *p; }
inline float load_scalar(const uint16_t* p) { return bf16_to_float(*p); }
inline float load_scalar(const int8_t* p) { return static_cast<float>(*p); }

// ---------------------------------------------------------------------------------------------
// SIMD traits. One "step" along K covers P vectors of fp32 lanes: P = 1 for fp32 weights, P = 2 for bf16
// weights, whose 2 * lanes elements are loaded in one go and widened without shuffles: a bf16 is the top
// half of an fp32, so the odd elements are (w & 0xffff0000) and the even ones (w << 16). x is packed in
// the same order (even elements of the step, then the odd ones), so the dot product is unchanged.
#if defined(__AVX512F__)
struct Simd {
  using V = __m512;
  static constexpr int kLanes = 16;
  static constexpr int kRows = 4;   // weight rows per group: 4 x 4 accumulators + 4 weights < 32 zmm
  static constexpr int kChunk = 4;  // batch rows per pass over a K block
  static V zero() { return _mm512_setzero_ps(); }
  static V loadx(const float* p) { return _mm512_loadu_ps(p); }
  static void loadw(const float* p, V* v) { v[0] = _mm512_loadu_ps(p); }
  static void loadw(const uint16_t* p, V* v) {
    __m512i h = _mm512_loadu_si512(p);
    v[0] = _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
    v[1] = _mm512_castsi512_ps(_mm512_and_si512(h, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  static void loadw(const int8_t* p, V* v) {  // 32 int8 in natural order
    v[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    v[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
  }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
  static float sum(V v) { return _mm512_reduce_add_ps(v); }
};
#elif defined(__AVX2__)
struct Simd {
  using V = __m256;
  static constexpr int kLanes = 8;
  static constexpr int kRows = 2;  // only 16 ymm registers: 2 x 4 accumulators + 4 weights + x
  static constexpr int kChunk = 4;
  static V zero() { return _mm256_setzero_ps(); }
  static V loadx(const float* p) { return _mm256_loadu_ps(p); }
  static void loadw(const float* p, V* v) { v[0] = _mm256_loadu_ps(p); }
  static void loadw(const uint16_t* p, V* v) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    v[0] = _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
    v[1] = _mm256_castsi256_ps(_mm256_and_si256(h, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  static void loadw(const int8_t* p, V* v) {  // 16 int8 in natural order
    v[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
    v[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8))));
  }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
  static float sum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
#else
struct Simd {  // plain C++: the same loops with one-float "vectors"
  using V = float;
  static constexpr int kLanes = 1;
  static constexpr int kRows = 2;
  static constexpr int kChunk = 4;
  static V zero() { return 0.f; }
  static V loadx(const float* p) { return *p; }
  static void loadw(const float* p, V* v) { v[0] = *p; }
  static void loadw(const uint16_t* p, V* v) { v[0] = bf16_to_float(p[0]); v[1] = bf16_to_float(p[1]); }
  static void loadw(const int8_t* p, V* v) { v[0] = p[0]; v[1] = p[1]; }
  static V fma(V a, V b, V c) { return a * b + c; }
  static void prefetch(const void*) {}
  static float sum(V v) { return v; }
};
#endif

// Vectors per K step: 2 for bf16 (split even/odd) and int8 (two runs of lanes in natural order), 1 for fp32.
template <typename WT> constexpr int kParts = sizeof(WT) == 4 ? 1 : 2;
template <typename WT> constexpr int kStep = kParts<WT> * Simd::kLanes;  // K elements per step
template <typename WT> constexpr bool kEvenOdd = sizeof(WT) == 2;  // x packed even/odd to match bf16 loads

// acc[r * BC + b] += W[r, k0:k1] . x[b, k0:k1] over whole steps. `x` is the packed block: row b at
// x + b * len, k relative to k0. The accumulators stay in registers (loops fully unrolled on R, BC).
template <typename WT, int R, int BC>
inline void block_dot(const WT* w, int64_t ldw, const float* x, int64_t len, typename Simd::V* acc,
                      const WT* pf, unsigned pf_rows) {
  using V = typename Simd::V;
  constexpr int P = kParts<WT>;
  V a[R][BC];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int b = 0; b < BC; ++b) a[r][b] = acc[r * BC + b];
  for (int64_t k = 0; k < len; k += kStep<WT>) {
    V wv[R][P];
    if (pf) {
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
        if (pf_rows >> r & 1) Simd::prefetch(pf + r * ldw + k);
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) Simd::loadw(w + r * ldw + k, wv[r]);
#pragma GCC unroll 16
    for (int b = 0; b < BC; ++b) {
#pragma GCC unroll 2
      for (int p = 0; p < P; ++p) {
        V xv = Simd::loadx(x + b * len + k + p * Simd::kLanes);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) a[r][b] = Simd::fma(wv[r][p], xv, a[r][b]);
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int b = 0; b < BC; ++b) acc[r * BC + b] = a[r][b];
}

template <typename WT, int R>
inline void block_dot_n(int nb, const WT* w, int64_t ldw, const float* x, int64_t len, typename Simd::V* acc,
                        const WT* pf, unsigned pf_rows) {
  static_assert(Simd::kChunk == 4, "dispatch below covers chunks of 1..4 batch rows");
  switch (nb) {
    case 1: block_dot<WT, R, 1>(w, ldw, x, len, acc, pf, pf_rows); break;
    case 2: block_dot<WT, R, 2>(w, ldw, x, len, acc, pf, pf_rows); break;
    case 3: block_dot<WT, R, 3>(w, ldw, x, len, acc, pf, pf_rows); break;
    default: block_dot<WT, R, 4>(w, ldw, x, len, acc, pf, pf_rows); break;
  }
}

// x prepared once per call: `packed` holds the whole steps of K, block by block ([block][b][len], with
// bf16 steps split even/odd), so a block's x rows are contiguous in L1 instead of a K stride apart (K*4
// is often a multiple of 4 KB, which would map every row to the same L1 set); `plain` [B][K] serves the
// tail of K that does not fill a step. int8 steps keep x in natural order.
struct PackedX {
  std::vector<float> packed;
  const float* plain;
  int64_t B, K, kvec, kblock;
};

template <typename WT>
PackedX pack_x(const float* x, int64_t B, int64_t K) {
  constexpr int S = kStep<WT>;
  PackedX px;
  px.plain = x;
  px.B = B;
  px.K = K;
  px.kvec = K - K % S;
  // One chunk covers the batch: nothing is re-read, the block can be all of K. Otherwise R weight rows
  // and the block's x rows (up to 16 x 256 x 4 = 16 KB) must stay in the 32-48 KB L1.
  px.kblock = B <= Simd::kChunk ? std::max<int64_t>(px.kvec, S) : kBlock;
  px.packed.resize(static_cast<size_t>(B * px.kvec));
  float* out = px.packed.data();
  for (int64_t k0 = 0; k0 < px.kvec; k0 += px.kblock) {
    const int64_t len = std::min(px.kblock, px.kvec - k0);
    for (int64_t b = 0; b < B; ++b, out += len) {
      const float* src = x + b * K + k0;
      if (!kEvenOdd<WT>) {
        std::memcpy(out, src, static_cast<size_t>(len) * sizeof(float));
        continue;
      }
      for (int64_t s = 0; s < len; s += S)
        for (int l = 0; l < Simd::kLanes; ++l) {
          out[s + l] = src[s + 2 * l];
          out[s + Simd::kLanes + l] = src[s + 2 * l + 1];
        }
    }
  }
  return px;
}

// R output rows starting at weight row `w`: out[b * R + r] = dot(W[r], x[b]) for all b < B.
template <typename WT, int R>
void rows_dot(const WT* w, const PackedX& px, float* out, bool prefetch) {
  using V = typename Simd::V;
  constexpr int C = Simd::kChunk;
  const int64_t B = px.B, K = px.K, chunks = (B + C - 1) / C;
  V acc[R * kMaxB];  // chunk starting at b0: acc[b0 * R + r * nb + b]
  for (int i = 0; i < R * B; ++i) acc[i] = Simd::zero();
  for (int64_t k0 = 0; k0 < px.kvec; k0 += px.kblock) {
    const int64_t len = std::min(px.kblock, px.kvec - k0);
    const float* xb = px.packed.data() + B * k0;
    for (int64_t b0 = 0; b0 < B; b0 += C) {
      const int nb = static_cast<int>(std::min<int64_t>(C, B - b0));
      // chunk c prefetches rows r with r % chunks == c: the prefetches are spread over the whole pass
      unsigned pf_rows = 0;
      for (int r = static_cast<int>(b0 / C); r < R; r += static_cast<int>(chunks)) pf_rows |= 1u << r;
      block_dot_n<WT, R>(nb, w + k0, K, xb + b0 * len, len, acc + b0 * R, prefetch ? w + k0 + R * K : nullptr,
                         pf_rows);
    }
  }
  for (int64_t b0 = 0; b0 < B; b0 += C) {
    const int nb = static_cast<int>(std::min<int64_t>(C, B - b0));
    for (int r = 0; r < R; ++r) {
      for (int b = 0; b < nb; ++b) {
        float s = Simd::sum(acc[b0 * R + r * nb + b]);
        const float* xr = px.plain + (b0 + b) * K;
        for (int64_t k = px.kvec; k < K; ++k) s += load_scalar(w + r * K + k) * xr[k];
        out[(b0 + b) * R + r] = s;
      }
    }
  }
}

template <int N>
using Rows = std::integral_constant<int, N>;  // a row count passed to generic lambdas as a compile-time value

// Rows [n0, n1) of one weight, R at a time, then one at a time: dot(Rows<r>{}, n, prefetch) fills the caller's
// out[B][r] for rows n..n+r-1 (prefetching the next group while another follows), emit(n, r) stores them.
template <int R, typename Dot, typename Emit>
inline void row_groups(int64_t n0, int64_t n1, const Dot& dot, const Emit& emit) {
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    dot(Rows<R>{}, n, n + 2 * R <= n1);
    emit(n, R);
  }
  for (; n < n1; ++n) {
    dot(Rows<1>{}, n, false);
    emit(n, 1);
  }
}

// Several weights (ns[i] rows each) in one parallel loop over their groups of R rows, so the threads are woken
// once for all of them (q/k/v, gate/up): part(i, n0, n1) computes rows [n0, n1) of weight i. `grain`: the
// fewest groups a task takes.
template <int R, typename Part>
void parallel_row_groups(const std::vector<int64_t>& ns, int64_t grain, const Part& part) {
  std::vector<int64_t> first{0};  // first row group of each weight
  for (int64_t n : ns) first.push_back(first.back() + (n + R - 1) / R);
  at::parallel_for(0, first.back(), grain, [&](int64_t g0, int64_t g1) {
    for (size_t i = 0; i < ns.size(); ++i) {
      const int64_t a = std::max(g0, first[i]), b = std::min(g1, first[i + 1]);
      if (a < b) part(i, (a - first[i]) * R, std::min(ns[i], (b - first[i]) * R));
    }
  });
}

// y[b, n] for n in [n0, n1); OT is the output element type; `scale` (int8 weights) multiplies row n's dot.
template <typename WT, typename OT>
void gemm_rows(const WT* w, const PackedX& px, const float* scale, const float* bias, OT* y, int64_t N, int64_t n0,
               int64_t n1) {
  constexpr int R = Simd::kRows;
  const int64_t B = px.B, K = px.K;
  float out[kMaxB * R];
  auto emit = [&](int64_t n, int rows) {
    for (int64_t b = 0; b < B; ++b)
      for (int r = 0; r < rows; ++r) {
        float v = out[b * rows + r] * (scale ? scale[n + r] : 1.f) + (bias ? bias[n + r] : 0.f);
        y[b * N + n + r] = static_cast<OT>(v);
      }
  };
  row_groups<R>(n0, n1, [&](auto rows, int64_t n, bool prefetch) {
    rows_dot<WT, decltype(rows)::value>(w + n * K, px, out, prefetch);
  }, emit);
}

// Several weights of the same K against one x (q/k/v, gate/up): x is packed once and one parallel loop runs
// over the row groups of all of them, so the threads are woken once.
template <typename WT, typename OT>
void gemm_multi(const std::vector<const WT*>& ws, const std::vector<int64_t>& ns, const float* x,
                const std::vector<const float*>& scales, const float* bias, const std::vector<OT*>& ys, int64_t B,
                int64_t K) {
  constexpr int R = Simd::kRows;
  const PackedX px = pack_x<WT>(x, B, K);
  // Give each task at least ~128 KB of weights: below that, waking threads costs more than it saves.
  const int64_t group_bytes = R * K * static_cast<int64_t>(sizeof(WT));
  const int64_t grain = std::max<int64_t>(1, (128 << 10) / std::max<int64_t>(1, group_bytes));
  parallel_row_groups<R>(ns, grain, [&](size_t i, int64_t n0, int64_t n1) {
    gemm_rows<WT, OT>(ws[i], px, scales[i], bias, ys[i], ns[i], n0, n1);
  });
}

template <typename WT, typename OT>
void gemm(const WT* w, const float* x, const float* scale, const float* bias, OT* y, int64_t B, int64_t N,
          int64_t K) {
  gemm_multi<WT, OT>({w}, {N}, x, {scale}, bias, {y}, B, K);
}

std::string isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "scalar";
#endif
}


at::Tensor small_gemm(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "small_gemm: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "small_gemm: x [B, K] and weight [N, K]");
  TORCH_CHECK(weight.is_contiguous(), "small_gemm: weight must be contiguous");
  const int64_t B = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "small_gemm: x and weight disagree on in_features");
  IDEFICS2_CHECK(B <= kMaxB, "small_gemm: at most %d rows", kMaxB);
  const auto wt = weight.scalar_type();
  const auto xt = x.scalar_type();
  TORCH_CHECK(wt == at::kFloat || wt == at::kBFloat16, "small_gemm: fp32 or bf16 weight");
  TORCH_CHECK(xt == wt || (xt == at::kFloat && wt == at::kBFloat16),
              "small_gemm: x must have the weight's dtype (or be fp32 with bf16 weight)");

  at::Tensor y = at::empty({B, N}, x.options());
  if (B == 0 || N == 0) return y;
  // x is tiny (<= 16 rows): widen it to fp32 once so the inner loop only converts weights.
  at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor bf;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "small_gemm: bias must be [N]");
    bf = bias->to(at::kFloat).contiguous();
  }
  const float* xp = xf.data_ptr<float>();
  const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;

  if (wt == at::kFloat) {
    gemm<float, float>(weight.data_ptr<float>(), xp, nullptr, bp, y.data_ptr<float>(), B, N, K);
  } else {
    const auto* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr<c10::BFloat16>());
    if (xt == at::kFloat) {
      gemm<uint16_t, float>(wp, xp, nullptr, bp, y.data_ptr<float>(), B, N, K);
    } else {
      gemm<uint16_t, c10::BFloat16>(wp, xp, nullptr, bp, y.data_ptr<c10::BFloat16>(), B, N, K);
    }
  }
  return y;
}

std::vector<at::Tensor> small_gemm_multi(const at::Tensor& x, at::TensorList weights) {
  TORCH_CHECK(!weights.empty(), "small_gemm_multi: no weights");
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "small_gemm_multi: CPU x [B, K]");
  const int64_t B = x.size(0), K = x.size(1);
  IDEFICS2_CHECK(B <= kMaxB, "small_gemm_multi: at most %d rows", kMaxB);
  const auto wt = weights[0].scalar_type();
  TORCH_CHECK(wt == at::kFloat || wt == at::kBFloat16, "small_gemm_multi: fp32 or bf16 weights");
  TORCH_CHECK(x.scalar_type() == wt || (x.scalar_type() == at::kFloat && wt == at::kBFloat16),
              "small_gemm_multi: x must have the weights' dtype (or be fp32 with bf16 weights)");
  std::vector<at::Tensor> ys;
  std::vector<int64_t> ns;
  for (const at::Tensor& w : weights) {
    TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.size(1) == K && w.scalar_type() == wt && w.is_contiguous(),
                "small_gemm_multi: contiguous CPU weights [N_i, K] of one dtype");
    ns.push_back(w.size(0));
    ys.push_back(at::empty({B, w.size(0)}, x.options()));
  }
  if (B == 0) return ys;
  at::Tensor xf = x.to(at::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  auto run = [&](auto* tag_w, auto* tag_y) {
    using WT = std::remove_pointer_t<decltype(tag_w)>;
    using OT = std::remove_pointer_t<decltype(tag_y)>;
    std::vector<const WT*> wp;
    std::vector<OT*> yp;
    for (size_t i = 0; i < weights.size(); ++i) {
      wp.push_back(reinterpret_cast<const WT*>(weights[i].data_ptr()));
      yp.push_back(reinterpret_cast<OT*>(ys[i].data_ptr()));
    }
    gemm_multi<WT, OT>(wp, ns, xp, std::vector<const float*>(wp.size(), nullptr), nullptr, yp, B, K);
  };
  if (wt == at::kFloat) run(static_cast<float*>(nullptr), static_cast<float*>(nullptr));
  else if (x.scalar_type() == at::kFloat) run(static_cast<uint16_t*>(nullptr), static_cast<float*>(nullptr));
  else run(static_cast<uint16_t*>(nullptr), static_cast<c10::BFloat16*>(nullptr));
  return ys;
}

// ---------------------------------------------------------------------------------------------
// int8 weights with AVX512-VNNI: x is quantized to int16 per (row, chunk of 512 along K) with scale
// max|x| / 32767 (relative error <= 1.5e-5 of the chunk's largest value, below bf16's rounding), weights are
// widened to int16 (one vpmovsxbw per 32), and vpdpwssd multiplies 32 pairs and adds them into int32 lanes:
// 2 instructions per 32 weights instead of 6 for widening to fp32 and FMAs. A chunk adds at most
// 32 x 32767 x 128 < 2^27 per lane, so the int32 sums are exact; they are converted and scaled into fp32
// totals at the end of each chunk. Used for K a multiple of 32; other shapes take the fp32 path above.
#if defined(__AVX512F__)
using idefics2_kernels::load16;  // 16 fp32 / bf16 values as fp32 lanes (bf16.h)

// max |x[k]| over k in [0, n), n a multiple of 16 (an activation's scale before it is quantized).
template <typename XT>
inline float abs_max(const XT* x, int64_t n) {
  const __m512 sign_off = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  __m512 m = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; k += 16) m = _mm512_max_ps(m, _mm512_and_ps(load16(x + k), sign_off));
  return _mm512_reduce_max_ps(m);
}

// The K blocks and batch chunks of C rows of one group of weight rows: block(Rows<nb>{}, b0, k0, k1, prefetch)
// adds K range [k0, k1) for batch rows b0..b0+nb-1. All of K at once when the batch fits one chunk, else
// `kblock` at a time, so each chunk re-reads the block's weights from L1 rather than memory.
template <int C, typename Block>
inline void batch_chunks(int64_t B, int64_t K, int64_t kblock, bool prefetch, const Block& block) {
  const int64_t len = B <= C ? K : kblock;
  for (int64_t k0 = 0; k0 < K; k0 += len) {
    const int64_t k1 = std::min(K, k0 + len);
    for (int64_t b0 = 0; b0 < B; b0 += C) {
      const int nb = static_cast<int>(std::min<int64_t>(C, B - b0));
      const bool pf = prefetch && b0 == 0;
      switch (nb) {
        case 1: block(Rows<1>{}, b0, k0, k1, pf); break;
        case 2: block(Rows<2>{}, b0, k0, k1, pf); break;
        case 3: block(Rows<C == 4 ? 3 : 2>{}, b0, k0, k1, pf); break;
        default: block(Rows<C>{}, b0, k0, k1, pf); break;
      }
    }
  }
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr bool kHaveVnni = true;
constexpr int64_t kVnniChunk = 512;   // K elements per int16 scale of x and per exact int32 sum
constexpr int64_t kVnniBlock = 2048;  // K block when the batch takes several passes (a multiple of the chunk)

struct QuantizedX {
  std::vector<int16_t> q;     // [B, K]
  std::vector<float> scale;   // [B, chunks]
  int64_t chunks;
};

// x (fp32 or bf16, read as is: no converted copy) -> int16 codes and per-chunk scales. K % 16 == 0.
template <typename XT>
QuantizedX quantize_x(const XT* x, int64_t B, int64_t K) {
  QuantizedX qx;
  qx.chunks = (K + kVnniChunk - 1) / kVnniChunk;
  qx.q.resize(static_cast<size_t>(B * K));
  qx.scale.resize(static_cast<size_t>(B * qx.chunks));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < qx.chunks; ++c) {
      const int64_t k0 = c * kVnniChunk, k1 = std::min(K, k0 + kVnniChunk);
      const XT* xr = x + b * K;
      const float amax = abs_max(xr + k0, k1 - k0);
      const float inv = amax > 0.f ? 32767.f / amax : 0.f;
      qx.scale[b * qx.chunks + c] = amax > 0.f ? amax / 32767.f : 0.f;
      const __m512 vinv = _mm512_set1_ps(inv);
      int16_t* qr = qx.q.data() + b * K;
      for (int64_t k = k0; k < k1; k += 16) {
        const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(load16(xr + k), vinv));  // round to nearest
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(qr + k), _mm512_cvtsepi32_epi16(v));
      }
    }
  return qx;
}

// total[r * BC + b] += sum over k in [k0, k1) (chunk-aligned) of W[r, k] * x[b, k], W int8, x the int16 codes
// times their chunk scale.
template <int R, int BC>
inline void vnni_block(const int8_t* w, int64_t ldw, const QuantizedX& qx, int64_t K, int64_t b0, int64_t k0,
                       int64_t k1, __m512* total, bool prefetch) {
  // Only the int32 sums live in registers (R x BC + R weights + 1 x <= 32 zmm); the fp32 totals are touched
  // once per chunk.
  for (int64_t c0 = k0; c0 < k1; c0 += kVnniChunk) {
    const int64_t c1 = std::min(k1, c0 + kVnniChunk);
    __m512i acc[R][BC];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int b = 0; b < BC; ++b) acc[r][b] = _mm512_setzero_si512();
    for (int64_t k = c0; k < c1; k += 32) {
      __m512i wv[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const int8_t* p = w + r * ldw + k;
        if (prefetch) Simd::prefetch(p + R * ldw);
        wv[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      }
#pragma GCC unroll 8
      for (int b = 0; b < BC; ++b) {
        const __m512i xv = _mm512_loadu_si512(qx.q.data() + (b0 + b) * K + k);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[r][b] = _mm512_dpwssd_epi32(acc[r][b], wv[r], xv);
      }
    }
    const int64_t chunk = c0 / kVnniChunk;
#pragma GCC unroll 8
    for (int b = 0; b < BC; ++b) {
      const __m512 s = _mm512_set1_ps(qx.scale[(b0 + b) * qx.chunks + chunk]);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
        total[r * BC + b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][b]), s, total[r * BC + b]);
    }
  }
}

// out[b * R + r] = dot(W[r], x[b]) for all b < B, C batch rows per pass.
template <int R, int C>
void vnni_rows(const int8_t* w, const QuantizedX& qx, int64_t B, int64_t K, float* out, bool prefetch) {
  __m512 acc[R * kMaxB];
  for (int i = 0; i < R * B; ++i) acc[i] = _mm512_setzero_ps();
  batch_chunks<C>(B, K, kVnniBlock, prefetch, [&](auto rows, int64_t b0, int64_t k0, int64_t k1, bool pf) {
    vnni_block<R, decltype(rows)::value>(w, K, qx, K, b0, k0, k1, acc + b0 * R, pf);
  });
  for (int64_t b0 = 0; b0 < B; b0 += C) {
    const int nb = static_cast<int>(std::min<int64_t>(C, B - b0));
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < nb; ++b) out[(b0 + b) * R + r] = _mm512_reduce_add_ps(acc[b0 * R + r * nb + b]);
  }
}

template <typename OT>
void vnni_multi(const std::vector<const int8_t*>& ws, const std::vector<int64_t>& ns,
                const std::vector<const float*>& scales, const std::vector<OT*>& ys, const OT* x, int64_t B,
                int64_t K) {
  constexpr int R = 4, C = 4;  // 16 int32 sums + 4 weights + 1 x in registers
  const QuantizedX qx = quantize_x(x, B, K);
  const int64_t grain = std::max<int64_t>(1, (128 << 10) / std::max<int64_t>(1, R * K));
  parallel_row_groups<R>(ns, grain, [&](size_t i, int64_t n0, int64_t n1) {
    float out[kMaxB * R];
    const int64_t N = ns[i];
    row_groups<R>(n0, n1, [&](auto rows, int64_t n, bool prefetch) {
      vnni_rows<decltype(rows)::value, C>(ws[i] + n * K, qx, B, K, out, prefetch);
    }, [&](int64_t n, int rows) {
      for (int64_t b = 0; b < B; ++b)
        for (int r = 0; r < rows; ++r) ys[i][b * N + n + r] = static_cast<OT>(out[b * rows + r] * scales[i][n + r]);
    });
  });
}
#else
constexpr bool kHaveVnni = false;
#endif

bool vnni_int8(int64_t K) { return kHaveVnni && K % 32 == 0 && K > 0; }  // which int8 path serves this K

// int8 weights (one, or several of the same K against one x: q/k/v, gate/up), in one parallel loop.
std::vector<at::Tensor> small_gemm_int8_multi(const at::Tensor& x, at::TensorList qweights, at::TensorList scales) {
  TORCH_CHECK(!qweights.empty() && qweights.size() == scales.size(), "small_gemm_int8_multi: one scale per weight");
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "small_gemm_int8_multi: CPU x [B, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "small_gemm_int8_multi: fp32 or bf16 x");
  const int64_t B = x.size(0), K = x.size(1);
  IDEFICS2_CHECK(B <= kMaxB, "small_gemm_int8_multi: at most %d rows", kMaxB);
  std::vector<const int8_t*> wp;
  std::vector<const float*> sp;
  std::vector<int64_t> ns;
  std::vector<at::Tensor> ys;
  for (size_t i = 0; i < qweights.size(); ++i) {
    const at::Tensor& q = qweights[i];
    TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kChar && q.dim() == 2 && q.size(1) == K &&
                    q.is_contiguous(), "small_gemm_int8_multi: contiguous int8 qweights [N_i, K]");
    TORCH_CHECK(scales[i].scalar_type() == at::kFloat && scales[i].is_contiguous() && scales[i].numel() == q.size(0),
                "small_gemm_int8_multi: fp32 scales [N_i]");
    wp.push_back(q.data_ptr<int8_t>());
    sp.push_back(scales[i].data_ptr<float>());
    ns.push_back(q.size(0));
    ys.push_back(at::empty({B, q.size(0)}, x.options()));
  }
  if (B == 0) return ys;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  if (vnni_int8(K)) {  // reads x in its own dtype: no fp32 copy
    const at::Tensor xc = x.contiguous();
    if (x.scalar_type() == at::kFloat) {
      std::vector<float*> yp;
      for (auto& y : ys) yp.push_back(y.data_ptr<float>());
      vnni_multi<float>(wp, ns, sp, yp, xc.data_ptr<float>(), B, K);
    } else {
      std::vector<c10::BFloat16*> yp;
      for (auto& y : ys) yp.push_back(y.data_ptr<c10::BFloat16>());
      vnni_multi<c10::BFloat16>(wp, ns, sp, yp, xc.data_ptr<c10::BFloat16>(), B, K);
    }
    return ys;
  }
#endif
  at::Tensor xf = x.to(at::kFloat).contiguous();
  if (x.scalar_type() == at::kFloat) {
    std::vector<float*> yp;
    for (auto& y : ys) yp.push_back(y.data_ptr<float>());
    gemm_multi<int8_t, float>(wp, ns, xf.data_ptr<float>(), sp, nullptr, yp, B, K);
  } else {
    std::vector<c10::BFloat16*> yp;
    for (auto& y : ys) yp.push_back(y.data_ptr<c10::BFloat16>());
    gemm_multi<int8_t, c10::BFloat16>(wp, ns, xf.data_ptr<float>(), sp, nullptr, yp, B, K);
  }
  return ys;
}

// ---------------------------------------------------------------------------------------------
// int4 weights in groups along K: w[n, k] = (q[n, k] - 8) * scale[n, g] + zero[n, g], g = k / group.
// Layout (idefics2's "x16"): rows in blocks of 16. A block is K / 8 steps of 64 bytes; byte 4r + t of step s holds
// q[16 block + r, 8s + t] in its low nibble and q[16 block + r, 8s + 4 + t] in its high nibble. So one 64-byte
// load and two masks give 16 rows x 4 consecutive k as unsigned bytes, the operand AVX512-VNNI's vpdpbusd
// multiplies by 4 int8 activations broadcast to every lane, summing into one int32 lane per row: no shuffles and
// no horizontal sums. scales and zeros are [N / 16, G, 16] (a block's 16 rows side by side, one load each).
// Activations are quantized per row and group to int8 (x ~ sx * xq, sx = max |x| / 127, as llama.cpp's q8
// activations): per group, total += scale * sx * dot(q, xq) + (zero - 8 * scale) * sx * sum(xq), the product of
// the dequantized weights with the quantized activations up to fp32 rounding. int4 weights carry ~10x the error
// of this activation rounding.
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr bool kHaveInt4 = true;
constexpr int64_t kInt4Prefetch = 2048;  // bytes ahead in a block's stream

struct Int4X {                 // activations for the int4 kernel, per row b and group g
  std::vector<int8_t> q;       // [B, K]
  std::vector<float> scale;    // [B, G]: sx
  std::vector<float> sum;      // [B, G]: sx * sum(xq)
};

template <typename XT>
Int4X quantize_x_int8(const XT* x, int64_t B, int64_t K, int64_t group) {
  const int64_t G = K / group;
  Int4X qx{std::vector<int8_t>(static_cast<size_t>(B * K)), std::vector<float>(static_cast<size_t>(B * G)),
           std::vector<float>(static_cast<size_t>(B * G))};
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < G; ++g) {
      const XT* xr = x + b * K + g * group;
      const float amax = abs_max(xr, group);
      const float sx = amax / 127.f;
      const __m512 vinv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
      int8_t* qr = qx.q.data() + b * K + g * group;
      __m512i total = _mm512_setzero_si512();
      for (int64_t k = 0; k < group; k += 16) {
        const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(load16(xr + k), vinv));  // round to nearest
        total = _mm512_add_epi32(total, v);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + k), _mm512_cvtsepi32_epi8(v));
      }
      qx.scale[b * G + g] = sx;
      qx.sum[b * G + g] = sx * static_cast<float>(_mm512_reduce_add_epi32(total));
    }
  return qx;
}

inline __m512i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(c10::BFloat16* p, __m512 v) {  // round to nearest even, as c10::BFloat16(float) does
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  const __m512i out = _mm512_mask_blend_epi32(nan, _mm512_srli_epi32(rounded, 16), _mm512_set1_epi32(0x7fc0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(out));
}

// y[b0 + b, 16 blk + r] for RB blocks of 16 rows (w, scale, zero at the first one) and BC batch rows from b0.
template <int RB, int BC, int GROUP, typename OT>
inline void int4_blocks(const uint8_t* w, const uint16_t* scale, const uint16_t* zero, int64_t K, const Int4X& qx,
                        int64_t b0, OT* y, int64_t N) {
  const int64_t G = K / GROUP, block_bytes = 8 * K;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 tot[RB][BC];
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
    for (int b = 0; b < BC; ++b) tot[r][b] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i acc[RB][BC];
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
      for (int b = 0; b < BC; ++b) acc[r][b] = _mm512_setzero_si512();
#pragma GCC unroll 2
    for (int64_t k = g * GROUP; k < (g + 1) * GROUP; k += 8) {
      // Near a block's end, prefetch the start of the block this stream reads next (RB blocks further on):
      // the next pass's streams then start warm instead of stalling on their first lines.
      const int64_t ahead = 8 * k + kInt4Prefetch < block_bytes ? kInt4Prefetch
                                                                : kInt4Prefetch + (RB - 1) * block_bytes;
      __m512i xa[BC], xb[BC];
#pragma GCC unroll 8
      for (int b = 0; b < BC; ++b) {
        const int8_t* xr = qx.q.data() + (b0 + b) * K + k;
        xa[b] = broadcast4(xr), xb[b] = broadcast4(xr + 4);
      }
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) {
        const uint8_t* p = w + r * block_bytes + 8 * k;
        _mm_prefetch(reinterpret_cast<const char*>(p) + ahead, _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(p);
        const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
#pragma GCC unroll 8
        for (int b = 0; b < BC; ++b) {
          acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], lo, xa[b]);
          acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], hi, xb[b]);
        }
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) {
      const __m512 s = load16(scale + (r * G + g) * 16);
      const __m512 offset = _mm512_fmadd_ps(s, _mm512_set1_ps(-8.f), load16(zero + (r * G + g) * 16));
#pragma GCC unroll 8
      for (int b = 0; b < BC; ++b) {
        const __m512 d = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][b]), _mm512_set1_ps(qx.scale[(b0 + b) * G + g]));
        tot[r][b] = _mm512_fmadd_ps(offset, _mm512_set1_ps(qx.sum[(b0 + b) * G + g]), _mm512_fmadd_ps(d, s, tot[r][b]));
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
    for (int b = 0; b < BC; ++b) store16(y + (b0 + b) * N + 16 * r, tot[r][b]);
}

// Blocks [blk0, blk1) of one weight, RB at a time (the rest one by one), each for all B rows in passes of up to BC
// (later passes read the blocks from cache).
template <int RB, int BC, int GROUP, typename OT>
void int4_block_range(const uint8_t* w, const uint16_t* scale, const uint16_t* zero, int64_t K, const Int4X& qx,
                      int64_t B, OT* y, int64_t N, int64_t blk0, int64_t blk1) {
  const int64_t G = K / GROUP, block_bytes = 8 * K;
  auto passes = [&](auto blocks, int64_t blk) {
    constexpr int nr = decltype(blocks)::value;
    const uint8_t* wb = w + blk * block_bytes;
    const uint16_t *sb = scale + blk * G * 16, *zb = zero + blk * G * 16;
    OT* yb = y + 16 * blk;
    for (int64_t b0 = 0; b0 < B; b0 += BC) {
      switch (std::min<int64_t>(BC, B - b0)) {
        case 1: int4_blocks<nr, 1, GROUP>(wb, sb, zb, K, qx, b0, yb, N); break;
        case 2: int4_blocks<nr, BC >= 2 ? 2 : 1, GROUP>(wb, sb, zb, K, qx, b0, yb, N); break;
        case 3: int4_blocks<nr, BC >= 3 ? 3 : 1, GROUP>(wb, sb, zb, K, qx, b0, yb, N); break;
        default: int4_blocks<nr, BC, GROUP>(wb, sb, zb, K, qx, b0, yb, N); break;
      }
    }
  };
  int64_t blk = blk0;
  for (int64_t b = blk0; b < std::min(blk1, blk0 + RB); ++b)  // the first streams' first lines: no cold start
    for (int64_t off = 0; off < kInt4Prefetch; off += 64)
      _mm_prefetch(reinterpret_cast<const char*>(w + b * block_bytes + off), _MM_HINT_T0);
  for (; blk + RB <= blk1; blk += RB) passes(Rows<RB>{}, blk);
  for (; blk < blk1; ++blk) passes(Rows<1>{}, blk);
}

// One int4 weight of several (q/k/v, gate/up) sharing x: its packed nibbles, scales, zeros, rows and output.
template <typename OT>
struct Int4Weight {
  const uint8_t* w;
  const uint16_t* scale;
  const uint16_t* zero;
  int64_t N;
  OT* y;
};

template <int GROUP, typename OT>
void int4_gemm(const std::vector<Int4Weight<OT>>& ws, const Int4X& qx, int64_t B, int64_t K) {
  // Tasks of at least ~64 KB of weights: a thread streams a few blocks of 16 rows (8K bytes each) per task.
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / (8 * K));
  std::vector<int64_t> ns;
  for (const auto& wt : ws) ns.push_back(wt.N);
  parallel_row_groups<16>(ns, grain, [&](size_t i, int64_t n0, int64_t n1) {
    const Int4Weight<OT>& wt = ws[i];
    // 1-2 rows: 4 blocks (4 weight streams) x 1-2 rows of sums; more rows: 2 blocks x 4 rows (16 sums + 16 totals
    // + 4 nibble vectors + 8 broadcasts in 32 registers).
    if (B <= 2) int4_block_range<4, 2, GROUP>(wt.w, wt.scale, wt.zero, K, qx, B, wt.y, wt.N, n0 / 16, n1 / 16);
    else int4_block_range<2, 4, GROUP>(wt.w, wt.scale, wt.zero, K, qx, B, wt.y, wt.N, n0 / 16, n1 / 16);
  });
}

template <typename OT>
void int4_dispatch(int64_t group, const std::vector<Int4Weight<OT>>& ws, const Int4X& qx, int64_t B, int64_t K) {
  if (group == 32) int4_gemm<32, OT>(ws, qx, B, K);
  else if (group == 64) int4_gemm<64, OT>(ws, qx, B, K);
  else int4_gemm<128, OT>(ws, qx, B, K);
}
#else
constexpr bool kHaveInt4 = false;
#endif

// Shapes of an x16 int4 weight: qweight uint8 [N / 16, 8 K], scales / zeros bf16 [N / 16, K / group, 16].
void check_int4_weight(const char* op, const at::Tensor& q, const at::Tensor& scales, const at::Tensor& zeros,
                       int64_t K, int64_t group_size) {
  IDEFICS2_CHECK(group_size == 32 || group_size == 64 || group_size == 128, "%s: group 32, 64 or 128", op);
  IDEFICS2_CHECK(K > 0 && K % group_size == 0, "%s: K (%lld) must be a multiple of the group size %lld", op,
                 static_cast<long long>(K), static_cast<long long>(group_size));
  IDEFICS2_CHECK(q.device().is_cpu() && q.dim() == 2 && q.scalar_type() == at::kByte && q.is_contiguous() &&
                     q.size(1) == 8 * K, "%s: qweight must be contiguous uint8 [N / 16, 8 K] (the x16 layout)", op);
  for (const at::Tensor* t : {&scales, &zeros})
    IDEFICS2_CHECK(t->device().is_cpu() && t->scalar_type() == at::kBFloat16 && t->is_contiguous() && t->dim() == 3 &&
                       t->size(0) == q.size(0) && t->size(1) == K / group_size && t->size(2) == 16,
                   "%s: scales and zeros must be contiguous bf16 [N / 16, K / group, 16]", op);
}

// x [B, K] against several int4 weights of the same K (one kernel call, the threads woken once).
std::vector<at::Tensor> small_gemm_int4(const at::Tensor& x, at::TensorList qweights, at::TensorList scales,
                                        at::TensorList zeros, int64_t group_size) {
  IDEFICS2_CHECK(kHaveInt4, "small_gemm_int4: needs AVX512-VNNI (this build: %s)", isa().c_str());
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "small_gemm_int4: CPU x [B, K]");
  TORCH_CHECK(!qweights.empty() && scales.size() == qweights.size() && zeros.size() == qweights.size(),
              "small_gemm_int4: one scales and one zeros tensor per weight");
  const int64_t B = x.size(0), K = x.size(1);
  IDEFICS2_CHECK(B <= kMaxB, "small_gemm_int4: at most %d rows", kMaxB);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "small_gemm_int4: fp32 or bf16 x");
  std::vector<at::Tensor> ys;
  for (size_t i = 0; i < qweights.size(); ++i) {
    check_int4_weight("small_gemm_int4", qweights[i], scales[i], zeros[i], K, group_size);
    ys.push_back(at::empty({B, qweights[i].size(0) * 16}, x.options()));
  }
  if (B == 0) return ys;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  const at::Tensor xc = x.contiguous();
  const Int4X qx = x.scalar_type() == at::kFloat ? quantize_x_int8(xc.data_ptr<float>(), B, K, group_size)
                                                 : quantize_x_int8(xc.data_ptr<c10::BFloat16>(), B, K, group_size);
  auto run = [&](auto type_tag) {
    using OT = decltype(type_tag);
    std::vector<Int4Weight<OT>> ws;
    for (size_t i = 0; i < qweights.size(); ++i)
      ws.push_back({qweights[i].data_ptr<uint8_t>(),
                    reinterpret_cast<const uint16_t*>(scales[i].data_ptr<c10::BFloat16>()),
                    reinterpret_cast<const uint16_t*>(zeros[i].data_ptr<c10::BFloat16>()), ys[i].size(1),
                    ys[i].data_ptr<OT>()});
    int4_dispatch<OT>(group_size, ws, qx, B, K);
  };
  if (x.scalar_type() == at::kFloat) run(float{});
  else run(c10::BFloat16{});
#endif
  return ys;
}

// Dequantize to fp32 for the matrix-matrix case (prefill): the caller multiplies block by block with the GEMM
// library (fp32 sgemm beats bf16 matmul on CPUs without AMX, and beats torch's int8/int4 CPU ops), so only a
// block of float weights exists at a time. w = q * scale (int8) or (q - 8) * scale + zero (int4).
at::Tensor dequantize_int8(const at::Tensor& qweight, const at::Tensor& scales) {
  TORCH_CHECK(qweight.device().is_cpu() && qweight.scalar_type() == at::kChar && qweight.dim() == 2 &&
                  qweight.is_contiguous(), "dequantize_int8: contiguous CPU int8 qweight [N, K]");
  const int64_t N = qweight.size(0), K = qweight.size(1);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == N,
              "dequantize_int8: scales must be fp32 [N]");
  at::Tensor out = at::empty({N, K}, qweight.options().dtype(at::kFloat));
  const int8_t* q = qweight.data_ptr<int8_t>();
  const float* s = scales.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, (256 << 10) / std::max<int64_t>(1, K)), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t k = 0; k < K; ++k) o[n * K + k] = static_cast<float>(q[n * K + k]) * s[n];  // vectorized by gcc
  });
  return out;
}

at::Tensor dequantize_int4(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                           int64_t group_size) {
  TORCH_CHECK(qweight.dim() == 2, "dequantize_int4: qweight [N / 16, 8 K]");
  const int64_t blocks = qweight.size(0), K = qweight.size(1) / 8, G = K / std::max<int64_t>(1, group_size);
  check_int4_weight("dequantize_int4", qweight, scales, zeros, K, group_size);
  at::Tensor out = at::empty({blocks * 16, K}, qweight.options().dtype(at::kFloat));
  const uint8_t* q = qweight.data_ptr<uint8_t>();
  const auto* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<c10::BFloat16>());
  const auto* zp = reinterpret_cast<const uint16_t*>(zeros.data_ptr<c10::BFloat16>());
  float* o = out.data_ptr<float>();
  at::parallel_for(0, blocks * 16, std::max<int64_t>(1, (256 << 10) / K), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t blk = n / 16, r = n % 16;
      const uint8_t* block = q + blk * 8 * K;
      for (int64_t g = 0; g < G; ++g) {
        const float s = bf16_to_float(sp[(blk * G + g) * 16 + r]), z = bf16_to_float(zp[(blk * G + g) * 16 + r]);
        for (int64_t k = g * group_size; k < (g + 1) * group_size; k += 8)
          for (int t = 0; t < 4; ++t) {
            const unsigned byte = block[8 * k + 4 * r + t];
            o[n * K + k + t] = (static_cast<float>(byte & 15u) - 8.f) * s + z;
            o[n * K + k + 4 + t] = (static_cast<float>(byte >> 4) - 8.f) * s + z;
          }
      }
    }
  });
  return out;
}

// RMSNorm in one op instead of eight: y = weight * to_x_dtype(x * rsqrt(mean(x^2) + eps)), the normalisation in
// fp32 and rounded to x's dtype before the scale, as the checkpoints were trained with it. Rows in parallel
// (prefill: ~100 rows of a few KB each); the sum of squares in fp64, so its order does not matter.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "rms_norm: CPU tensors only");
  const int64_t H = weight.numel();
  TORCH_CHECK(weight.dim() == 1 && x.size(-1) == H, "rms_norm: weight [H] and x [..., H]");
  for (auto t : {x.scalar_type(), weight.scalar_type()})
    TORCH_CHECK(t == at::kFloat || t == at::kBFloat16, "rms_norm: fp32 or bf16 tensors");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();  // bf16 weights are read as they are
  const auto out_type = c10::promoteTypes(x.scalar_type(), weight.scalar_type());
  at::Tensor y = at::empty(x.sizes(), x.options().dtype(out_type));
  const int64_t rows = H ? x.numel() / H : 0;
  const bool x_bf16 = x.scalar_type() == at::kBFloat16, y_bf16 = out_type == at::kBFloat16;
  const bool w_bf16 = weight.scalar_type() == at::kBFloat16;
  const void* wp = wc.data_ptr();
  const void* xp = xc.data_ptr();
  void* yp = y.data_ptr();
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, H)), [&](int64_t r0, int64_t r1) {
    std::vector<float> v(static_cast<size_t>(H));
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t h = 0; h < H; ++h)
        v[h] = x_bf16 ? static_cast<float>(static_cast<const c10::BFloat16*>(xp)[r * H + h])
                      : static_cast<const float*>(xp)[r * H + h];
      double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // independent sums: no chain of dependent fp64 adds
      int64_t h = 0;
      for (; h + 8 <= H; h += 8)
        for (int i = 0; i < 8; ++i) part[i] += static_cast<double>(v[h + i]) * v[h + i];
      for (; h < H; ++h) part[0] += static_cast<double>(v[h]) * v[h];
      const double sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
      const float inv = 1.f / std::sqrt(static_cast<float>(sum / H) + static_cast<float>(eps));
      for (h = 0; h < H; ++h) {
        float n = v[h] * inv;
        if (x_bf16) n = static_cast<float>(c10::BFloat16(n));
        const float wh = w_bf16 ? static_cast<float>(static_cast<const c10::BFloat16*>(wp)[h])
                                : static_cast<const float*>(wp)[h];
        const float out = wh * n;
        if (y_bf16) static_cast<c10::BFloat16*>(yp)[r * H + h] = c10::BFloat16(out);
        else static_cast<float*>(yp)[r * H + h] = out;
      }
    }
  });
  return y;
}

// Rotary embedding in one op instead of about ten: x * cos + rotate_half(x) * sin with x [B, H, T, D],
// cos/sin [B, T, D] in x's dtype (roundings as the torch ops: see rope.h); head rows in parallel (prefill).
template <typename T>
void rope_rows(const T* x, const T* c, const T* s, T* y, int64_t B, int64_t H, int64_t L, int64_t D) {
  at::parallel_for(0, B * H * L, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, D)), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (H * L), t = i % L;
      idefics2_kernels::rope_vector(x + i * D, c + (b * L + t) * D, s + (b * L + t) * D, y + i * D, D);
    }
  });
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.size(3) % 2 == 0, "rope: CPU x [B, H, T, D], D even");
  const int64_t B = x.size(0), H = x.size(1), L = x.size(2), D = x.size(3);
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->dim() == 3 && t->size(0) == B && t->size(1) == L && t->size(2) == D &&
                    t->scalar_type() == x.scalar_type(), "rope: cos/sin [B, T, D] in x's dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "rope: fp32 or bf16");
  const at::Tensor xc = x.contiguous(), cc = cos.contiguous(), sc = sin.contiguous();
  at::Tensor y = at::empty({B, H, L, D}, x.options());
  if (x.scalar_type() == at::kFloat)
    rope_rows<float>(xc.data_ptr<float>(), cc.data_ptr<float>(), sc.data_ptr<float>(), y.data_ptr<float>(), B, H, L, D);
  else
    rope_rows<c10::BFloat16>(xc.data_ptr<c10::BFloat16>(), cc.data_ptr<c10::BFloat16>(), sc.data_ptr<c10::BFloat16>(),
                             y.data_ptr<c10::BFloat16>(), B, H, L, D);
  return y;
}

bool has_int4() { return kHaveInt4; }

}  // namespace

TORCH_LIBRARY(idefics2_kernels, m) {
  m.def("small_gemm(Tensor x, Tensor weight, Tensor? bias) -> Tensor", &small_gemm);
  m.def("small_gemm_multi(Tensor x, Tensor[] weights) -> Tensor[]", &small_gemm_multi);
  m.def("small_gemm_int8_multi(Tensor x, Tensor[] qweights, Tensor[] scales) -> Tensor[]", &small_gemm_int8_multi);
  m.def("small_gemm_int4(Tensor x, Tensor[] qweights, Tensor[] scales, Tensor[] zeros, int group_size) -> Tensor[]",
        &small_gemm_int4);
  m.def("dequantize_int8(Tensor qweight, Tensor scales) -> Tensor", &dequantize_int8);
  m.def("dequantize_int4(Tensor qweight, Tensor scales, Tensor zeros, int group_size) -> Tensor", &dequantize_int4);
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor", &rope);
  m.def("has_int4() -> bool", &has_int4);
  m.def("vnni_int8(int K) -> bool", &vnni_int8);
  m.def("isa() -> str", &isa);
}
