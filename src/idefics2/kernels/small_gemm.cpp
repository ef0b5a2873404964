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

#include <algorithm>
#include <cstdint>
#include <cstring>
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
  static V fma(V a, V b, V c) { return a * b + c; }
  static void prefetch(const void*) {}
  static float sum(V v) { return v; }
};
#endif

template <typename WT> constexpr int kParts = sizeof(WT) == 2 ? 2 : 1;       // vectors per K step
template <typename WT> constexpr int kStep = kParts<WT> * Simd::kLanes;  // K elements per step

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
// tail of K that does not fill a step.
struct PackedX {
  std::vector<float> packed;
  const float* plain;
  int64_t B, K, kvec, kblock;
};

template <typename WT>
PackedX pack_x(const float* x, int64_t B, int64_t K) {
  constexpr int S = kStep<WT>, P = kParts<WT>;
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
      if (P == 1) {
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

// y[b, n] for n in [n0, n1); OT is the output element type.
template <typename WT, typename OT>
void gemm_rows(const WT* w, const PackedX& px, const float* bias, OT* y, int64_t N, int64_t n0, int64_t n1) {
  constexpr int R = Simd::kRows;
  const int64_t B = px.B, K = px.K;
  float out[kMaxB * R];
  auto emit = [&](int64_t n, int rows) {
    for (int64_t b = 0; b < B; ++b)
      for (int r = 0; r < rows; ++r) {
        float v = out[b * rows + r] + (bias ? bias[n + r] : 0.f);
        y[b * N + n + r] = static_cast<OT>(v);
      }
  };
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    rows_dot<WT, R>(w + n * K, px, out, n + 2 * R <= n1);
    emit(n, R);
  }
  for (; n < n1; ++n) {
    rows_dot<WT, 1>(w + n * K, px, out, false);
    emit(n, 1);
  }
}

template <typename WT, typename OT>
void gemm(const WT* w, const float* x, const float* bias, OT* y, int64_t B, int64_t N, int64_t K) {
  constexpr int R = Simd::kRows;
  const PackedX px = pack_x<WT>(x, B, K);
  const int64_t groups = (N + R - 1) / R;
  // Give each task at least ~128 KB of weights: below that, waking threads costs more than it saves.
  const int64_t group_bytes = R * K * static_cast<int64_t>(sizeof(WT));
  const int64_t grain = std::max<int64_t>(1, (128 << 10) / std::max<int64_t>(1, group_bytes));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    gemm_rows<WT, OT>(w, px, bias, y, N, g0 * R, std::min(N, g1 * R));
  });
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
    gemm<float, float>(weight.data_ptr<float>(), xp, bp, y.data_ptr<float>(), B, N, K);
  } else {
    const auto* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr<c10::BFloat16>());
    if (xt == at::kFloat) {
      gemm<uint16_t, float>(wp, xp, bp, y.data_ptr<float>(), B, N, K);
    } else {
      gemm<uint16_t, c10::BFloat16>(wp, xp, bp, y.data_ptr<c10::BFloat16>(), B, N, K);
    }
  }
  return y;
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

}  // namespace

TORCH_LIBRARY(idefics2_kernels, m) {
  m.def("small_gemm(Tensor x, Tensor weight, Tensor? bias) -> Tensor", &small_gemm);
  m.def("isa() -> str", &isa);
}
