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
#include "rope.h"

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

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

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
  TORCH_CHECK(B <= kMaxB, "small_gemm: at most ", kMaxB, " rows");
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
  TORCH_CHECK(B <= kMaxB, "small_gemm_multi: at most ", kMaxB, " rows");
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
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {  // 16 bf16 -> fp32: a 16-bit shift
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline __m512 load16(const c10::BFloat16* p) { return load16(reinterpret_cast<const uint16_t*>(p)); }

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
  const __m512 sign_off = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < qx.chunks; ++c) {
      const int64_t k0 = c * kVnniChunk, k1 = std::min(K, k0 + kVnniChunk);
      const XT* xr = x + b * K;
      __m512 m = _mm512_setzero_ps();
      for (int64_t k = k0; k < k1; k += 16) m = _mm512_max_ps(m, _mm512_and_ps(load16(xr + k), sign_off));
      const float amax = _mm512_reduce_max_ps(m);
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
  TORCH_CHECK(B <= kMaxB, "small_gemm_int8_multi: at most ", kMaxB, " rows");
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
// Layout (idefics2's "chunk128"): row n is K / 128 chunks of 64 bytes = 32 little-endian 16-bit words; nibble j
// of word m of chunk c holds q[128c + 32j + m]. So one cache-line load gives four runs of 32 consecutive
// elements, each extracted into 32 words by a shift and a mask, with no shuffles. A word (q << 3) | 0x4180 is
// the bf16 number 16 + q (exponent 4, q in the top mantissa bits), exact; AVX512-BF16's dot product multiplies
// 32 of those by 32 bf16 activations (x is rounded to bf16, as torch's int4 kernel does) with fp32
// accumulation. Per group: total += scale * dot(16 + q, x); since q - 8 = (16 + q) - 24, the rest,
// sum over groups of (zero - 24 * scale) * sum(x over the group), is added per row at the end.
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
constexpr bool kHaveInt4 = true;

inline __m512 broadcast_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_set1_epi16(static_cast<short>(*p)), 16));
}

template <int R, int BC, int GROUP>
inline void int4_block(const uint8_t* w, int64_t ldw, const uint16_t* scale, int64_t ldg, const uint16_t* x,
                       int64_t ldx, int64_t k0, int64_t k1, __m512* total, bool prefetch) {
  static_assert(GROUP == 32 || GROUP == 64 || GROUP == 128, "group size 32, 64 or 128");
  const __m512i mantissa = _mm512_set1_epi16(0x78), exponent = _mm512_set1_epi16(0x4180);
  __m512 tot[R][BC], acc[R][BC];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int b = 0; b < BC; ++b) tot[r][b] = total[r * BC + b], acc[r][b] = _mm512_setzero_ps();
  for (int64_t k = k0; k < k1; k += 128) {
    __m512i raw[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = w + r * ldw + k / 2;
      if (prefetch) Simd::prefetch(p + R * ldw);
      raw[r] = _mm512_loadu_si512(p);
    }
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      __m512i wj[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        // nibble j moved to bits 3..6, then (t & 0x78) | 0x4180  (ternary-logic truth table 0xEA: (A & B) | C)
        const __m512i t = j == 0 ? _mm512_slli_epi16(raw[r], 3) : _mm512_srli_epi16(raw[r], 4 * j - 3);
        wj[r] = _mm512_ternarylogic_epi32(t, mantissa, exponent, 0xEA);
      }
#pragma GCC unroll 8
      for (int b = 0; b < BC; ++b) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + b * ldx + k + 32 * j);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], (__m512bh)wj[r], xv);
      }
      if ((32 * (j + 1)) % GROUP == 0) {  // a group ends here: scale its sums into the totals
        const int64_t g = (k + 32 * j) / GROUP;
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const __m512 s = broadcast_bf16(scale + r * ldg + g);
#pragma GCC unroll 8
          for (int b = 0; b < BC; ++b) {
            tot[r][b] = _mm512_fmadd_ps(acc[r][b], s, tot[r][b]);
            acc[r][b] = _mm512_setzero_ps();
          }
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int b = 0; b < BC; ++b) total[r * BC + b] = tot[r][b];
}

// Rows x batch rows per pass, with (group + total) accumulators = 16 zmm either way: 4 x 2 keeps more weight
// streams in flight for 1-2 rows; 2 x 4 decodes the weights half as often for more rows.
constexpr int64_t kInt4Block = 512;  // K block when the batch takes several passes (a multiple of 128)

// (zero - 24 * scale) . xsum over the groups of one row, for one batch row (16 groups at a time).
inline float int4_offset(const uint16_t* scale, const uint16_t* zero, const float* xsum, int64_t G) {
  __m512 acc = _mm512_setzero_ps();
  const __m512 c24 = _mm512_set1_ps(-24.f);
  int64_t g = 0;
  for (; g + 16 <= G; g += 16)
    acc = _mm512_fmadd_ps(_mm512_fmadd_ps(load16(scale + g), c24, load16(zero + g)), _mm512_loadu_ps(xsum + g), acc);
  float s = _mm512_reduce_add_ps(acc);
  for (; g < G; ++g) s += (bf16_to_float(zero[g]) - 24.f * bf16_to_float(scale[g])) * xsum[g];
  return s;
}

template <int R, int C, int GROUP>
void int4_rows(const uint8_t* w, int64_t ldw, const uint16_t* scale, const uint16_t* zero, int64_t G,
               const uint16_t* x, const float* xsum, int64_t B, int64_t K, float* out, bool prefetch) {
  static_assert(C == 2 || C == 4, "2 or 4 batch rows per pass");
  __m512 acc[R * kMaxB];
  for (int i = 0; i < R * B; ++i) acc[i] = _mm512_setzero_ps();
  batch_chunks<C>(B, K, kInt4Block, prefetch, [&](auto rows, int64_t b0, int64_t k0, int64_t k1, bool pf) {
    int4_block<R, decltype(rows)::value, GROUP>(w, ldw, scale, G, x + b0 * K, K, k0, k1, acc + b0 * R, pf);
  });
  for (int64_t b0 = 0; b0 < B; b0 += C) {
    const int nb = static_cast<int>(std::min<int64_t>(C, B - b0));
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < nb; ++b)
        out[(b0 + b) * R + r] = _mm512_reduce_add_ps(acc[b0 * R + r * nb + b]) +
                                int4_offset(scale + r * G, zero + r * G, xsum + (b0 + b) * G, G);
  }
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

template <int R, int C, int GROUP, typename OT>
void int4_gemm_rc(const std::vector<Int4Weight<OT>>& ws, const uint16_t* x, const float* xsum, int64_t B, int64_t K) {
  const int64_t G = K / GROUP, ldw = K / 2;
  // Split as finely as for bf16 weights of the same shape: per byte, int4 takes 4x the work.
  const int64_t grain = std::max<int64_t>(1, (128 << 10) / std::max<int64_t>(1, R * K * 2));
  std::vector<int64_t> ns;
  for (const auto& wt : ws) ns.push_back(wt.N);
  parallel_row_groups<R>(ns, grain, [&](size_t i, int64_t n0, int64_t n1) {
    const Int4Weight<OT>& wt = ws[i];
    float out[kMaxB * R];
    row_groups<R>(n0, n1, [&](auto rows, int64_t n, bool prefetch) {
      int4_rows<decltype(rows)::value, C, GROUP>(wt.w + n * ldw, ldw, wt.scale + n * G, wt.zero + n * G, G, x, xsum,
                                                 B, K, out, prefetch);
    }, [&](int64_t n, int rows) {
      for (int64_t b = 0; b < B; ++b)
        for (int r = 0; r < rows; ++r) wt.y[b * wt.N + n + r] = static_cast<OT>(out[b * rows + r]);
    });
  });
}

template <int GROUP, typename OT>
void int4_gemm(const std::vector<Int4Weight<OT>>& ws, const uint16_t* x, const float* xsum, int64_t B, int64_t K) {
  if (B <= 2) int4_gemm_rc<4, 2, GROUP, OT>(ws, x, xsum, B, K);
  else int4_gemm_rc<2, 4, GROUP, OT>(ws, x, xsum, B, K);
}

template <typename OT>
void int4_dispatch(int64_t group, const std::vector<Int4Weight<OT>>& ws, const uint16_t* x, const float* xsum,
                   int64_t B, int64_t K) {
  if (group == 32) int4_gemm<32, OT>(ws, x, xsum, B, K);
  else if (group == 64) int4_gemm<64, OT>(ws, x, xsum, B, K);
  else int4_gemm<128, OT>(ws, x, xsum, B, K);
}
#else
constexpr bool kHaveInt4 = false;
#endif

// x [B, K] against several int4 weights of the same K (one kernel call, the threads woken once).
std::vector<at::Tensor> small_gemm_int4(const at::Tensor& x, at::TensorList qweights, at::TensorList scales,
                                        at::TensorList zeros, int64_t group_size) {
  TORCH_CHECK(kHaveInt4, "small_gemm_int4: needs AVX512-BF16 (this build: ", isa(), ")");
  TORCH_CHECK(x.device().is_cpu(), "small_gemm_int4: CPU tensors only");
  TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128, "small_gemm_int4: group 32, 64 or 128");
  TORCH_CHECK(x.dim() == 2, "small_gemm_int4: x [B, K]");
  TORCH_CHECK(!qweights.empty() && scales.size() == qweights.size() && zeros.size() == qweights.size(),
              "small_gemm_int4: one scales and one zeros tensor per weight");
  const int64_t B = x.size(0), K = x.size(1), G = K / group_size;
  TORCH_CHECK(K % 128 == 0, "small_gemm_int4: K must be a multiple of 128");
  TORCH_CHECK(B <= kMaxB, "small_gemm_int4: at most ", kMaxB, " rows");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "small_gemm_int4: fp32 or bf16 x");
  std::vector<at::Tensor> ys;
  for (size_t i = 0; i < qweights.size(); ++i) {
    const at::Tensor& q = qweights[i];
    TORCH_CHECK(q.device().is_cpu() && q.dim() == 2 && q.scalar_type() == at::kByte && q.is_contiguous() &&
                    q.size(1) * 2 == K, "small_gemm_int4: qweight must be contiguous uint8 [N, K / 2]");
    for (const at::Tensor* t : {&scales[i], &zeros[i]})
      TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->is_contiguous() && t->dim() == 2 &&
                      t->size(0) == q.size(0) && t->size(1) == G,
                  "small_gemm_int4: scales and zeros must be contiguous bf16 [N, K / group]");
    ys.push_back(at::empty({B, q.size(0)}, x.options()));
  }
  if (B == 0) return ys;
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  at::Tensor xb = x.to(at::kBFloat16).contiguous();
  const auto* xp = reinterpret_cast<const uint16_t*>(xb.data_ptr<c10::BFloat16>());
  std::vector<float> xsum(static_cast<size_t>(B * G));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t k = g * group_size; k < (g + 1) * group_size; ++k) s += bf16_to_float(xp[b * K + k]);
      xsum[b * G + g] = s;
    }
  auto run = [&](auto type_tag) {
    using OT = decltype(type_tag);
    std::vector<Int4Weight<OT>> ws;
    for (size_t i = 0; i < qweights.size(); ++i)
      ws.push_back({qweights[i].data_ptr<uint8_t>(),
                    reinterpret_cast<const uint16_t*>(scales[i].data_ptr<c10::BFloat16>()),
                    reinterpret_cast<const uint16_t*>(zeros[i].data_ptr<c10::BFloat16>()), qweights[i].size(0),
                    ys[i].data_ptr<OT>()});
    int4_dispatch<OT>(group_size, ws, xp, xsum.data(), B, K);
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
  TORCH_CHECK(qweight.device().is_cpu() && qweight.scalar_type() == at::kByte && qweight.dim() == 2 &&
                  qweight.is_contiguous(), "dequantize_int4: contiguous CPU uint8 qweight [N, K / 2]");
  const int64_t N = qweight.size(0), K = qweight.size(1) * 2;
  TORCH_CHECK(K % 128 == 0 && (group_size == 32 || group_size == 64 || group_size == 128),
              "dequantize_int4: K a multiple of 128, group 32, 64 or 128");
  const int64_t G = K / group_size;
  for (const at::Tensor* t : {&scales, &zeros})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->is_contiguous() && t->numel() == N * G,
                "dequantize_int4: scales and zeros must be contiguous bf16 [N, K / group]");
  at::Tensor out = at::empty({N, K}, qweight.options().dtype(at::kFloat));
  const uint8_t* q = qweight.data_ptr<uint8_t>();
  const auto* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<c10::BFloat16>());
  const auto* zp = reinterpret_cast<const uint16_t*>(zeros.data_ptr<c10::BFloat16>());
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N, std::max<int64_t>(1, (256 << 10) / std::max<int64_t>(1, K)), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = q + n * (K / 2);
      for (int64_t c = 0; c < K / 128; ++c)
        for (int j = 0; j < 4; ++j) {
          const int64_t k0 = 128 * c + 32 * j, g = k0 / group_size;
          const float s = bf16_to_float(sp[n * G + g]), z = bf16_to_float(zp[n * G + g]);
          for (int m = 0; m < 32; ++m) {  // nibble j of word m is element k0 + m
            const unsigned word = row[64 * c + 2 * m] | (static_cast<unsigned>(row[64 * c + 2 * m + 1]) << 8);
            o[n * K + k0 + m] = (static_cast<float>((word >> (4 * j)) & 15u) - 8.f) * s + z;
          }
        }
    }
  });
  return out;
}

// RMSNorm for decoding, one op instead of eight: y = weight * to_x_dtype(x * rsqrt(mean(x^2) + eps)), the
// normalisation in fp32 and rounded to x's dtype before the scale, as the checkpoints were trained with it.
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
  std::vector<float> v(static_cast<size_t>(H));
  for (int64_t r = 0; r < rows; ++r) {  // decoding: a handful of rows, each a few KB
    for (int64_t h = 0; h < H; ++h)
      v[h] = x_bf16 ? static_cast<float>(static_cast<const c10::BFloat16*>(xp)[r * H + h])
                    : static_cast<const float*>(xp)[r * H + h];
    double sum = 0;  // fp64 accumulation: no order-dependent rounding to speak of
    for (int64_t h = 0; h < H; ++h) sum += static_cast<double>(v[h]) * v[h];
    const float inv = 1.f / std::sqrt(static_cast<float>(sum / H) + static_cast<float>(eps));
    for (int64_t h = 0; h < H; ++h) {
      float n = v[h] * inv;
      if (x_bf16) n = static_cast<float>(c10::BFloat16(n));
      const float wh = w_bf16 ? static_cast<float>(static_cast<const c10::BFloat16*>(wp)[h])
                              : static_cast<const float*>(wp)[h];
      const float out = wh * n;
      if (y_bf16) static_cast<c10::BFloat16*>(yp)[r * H + h] = c10::BFloat16(out);
      else static_cast<float*>(yp)[r * H + h] = out;
    }
  }
  return y;
}

// Rotary embedding for decoding, one op instead of about ten: x * cos + rotate_half(x) * sin with x [B, H, T, D],
// cos/sin [B, T, D] in x's dtype (roundings as the torch ops: see rope.h).
template <typename T>
void rope_rows(const T* x, const T* c, const T* s, T* y, int64_t B, int64_t H, int64_t L, int64_t D) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < L; ++t)
        idefics2_kernels::rope_vector(x + ((b * H + h) * L + t) * D, c + (b * L + t) * D, s + (b * L + t) * D,
                                      y + ((b * H + h) * L + t) * D, D);
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
