// y[B, N] = x[B, K] @ W[N, K]^T (+ bias) for small B (1..16), fp32 or bf16 weights.
//
// At small B a linear layer is bound by reading W from memory, so the kernel is built to stream W
// exactly once at close to memory bandwidth:
//   * threads split the output rows; each thread walks its own contiguous block of W rows;
//   * R weight rows are processed together (R sequential streams, R x BC independent accumulators);
//   * K is cut into blocks small enough that the R row slices and the x slice stay in L1: the first
//     batch chunk pulls the W slice from memory, the other batch chunks re-read it from L1;
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

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int kMaxB = 16;

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline float load_scalar(const float* p) { return *p; }
inline float load_scalar(const uint16_t* p) { return bf16_to_float(*p); }

// ---------------------------------------------------------------------------------------------
// SIMD traits: one vector of fp32 lanes, loads of fp32 / bf16 weights widened to fp32.
#if defined(__AVX512F__)
struct Simd {
  using V = __m512;
  static constexpr int kLanes = 16;
  static constexpr int kRows = 4;   // weight rows per group: 4 x 4 accumulators + 4 weights < 32 zmm
  static constexpr int kChunk = 4;  // batch rows per pass over a K block
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const uint16_t* p) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(V v) { return _mm512_reduce_add_ps(v); }
};
#elif defined(__AVX2__)
struct Simd {
  using V = __m256;
  static constexpr int kLanes = 8;
  static constexpr int kRows = 2;  // only 16 ymm registers: 2 x 4 accumulators + 2 weights + x
  static constexpr int kChunk = 4;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const uint16_t* p) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
#endif

#if defined(__AVX512F__) || defined(__AVX2__)

// acc[r * BC + b] += sum over k in [k0, k1) of W[r, k] * x[b, k]; k1 - k0 is a multiple of the lanes.
// The accumulators live in registers for the whole block (loops are fully unrolled on R and BC).
template <typename WT, int R, int BC>
inline void block_dot(const WT* w, int64_t ldw, const float* x, int64_t ldx, int64_t k0, int64_t k1,
                      typename Simd::V* acc) {
  using V = typename Simd::V;
  V a[R][BC];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int b = 0; b < BC; ++b) a[r][b] = acc[r * BC + b];
  for (int64_t k = k0; k < k1; k += Simd::kLanes) {
    V wv[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) wv[r] = Simd::load(w + r * ldw + k);
#pragma GCC unroll 16
    for (int b = 0; b < BC; ++b) {
      V xv = Simd::load(x + b * ldx + k);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) a[r][b] = Simd::fma(wv[r], xv, a[r][b]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int b = 0; b < BC; ++b) acc[r * BC + b] = a[r][b];
}

template <typename WT, int R>
inline void block_dot_n(int nb, const WT* w, int64_t ldw, const float* x, int64_t ldx, int64_t k0,
                        int64_t k1, typename Simd::V* acc) {
  static_assert(Simd::kChunk == 4, "dispatch below covers chunks of 1..4 batch rows");
  switch (nb) {
    case 1: block_dot<WT, R, 1>(w, ldw, x, ldx, k0, k1, acc); break;
    case 2: block_dot<WT, R, 2>(w, ldw, x, ldx, k0, k1, acc); break;
    case 3: block_dot<WT, R, 3>(w, ldw, x, ldx, k0, k1, acc); break;
    default: block_dot<WT, R, 4>(w, ldw, x, ldx, k0, k1, acc); break;
  }
}

// R output rows starting at weight row `w`: out[b][r] = dot(W[r], x[b]) for all b < B.
template <typename WT, int R>
void rows_dot(const WT* w, int64_t K, const float* x, int64_t B, int64_t kblock, float* out /*[B][R]*/) {
  using V = typename Simd::V;
  constexpr int C = Simd::kChunk;
  alignas(64) V acc[R * kMaxB];  // per chunk c: acc[c * R * C + r * nb + b]
  for (int i = 0; i < R * kMaxB; ++i) acc[i] = Simd::zero();
  const int64_t kvec = K - K % Simd::kLanes;
  for (int64_t k0 = 0; k0 < kvec; k0 += kblock) {
    const int64_t k1 = std::min(k0 + kblock, kvec);
    for (int64_t b0 = 0; b0 < B; b0 += C) {
      const int nb = static_cast<int>(std::min<int64_t>(C, B - b0));
      block_dot_n<WT, R>(nb, w, K, x + b0 * K, K, k0, k1, acc + b0 * R);
    }
  }
  for (int64_t b0 = 0; b0 < B; b0 += C) {
    const int nb = static_cast<int>(std::min<int64_t>(C, B - b0));
    for (int r = 0; r < R; ++r) {
      for (int b = 0; b < nb; ++b) {
        float s = Simd::sum(acc[b0 * R + r * nb + b]);
        for (int64_t k = kvec; k < K; ++k) s += load_scalar(w + r * K + k) * x[(b0 + b) * K + k];
        out[(b0 + b) * R + r] = s;
      }
    }
  }
}

#else  // plain C++ fallback: same blocking, scalar accumulators (the compiler may vectorise over b).

struct Simd {
  static constexpr int kLanes = 1;
  static constexpr int kRows = 2;
};

template <typename WT, int R>
void rows_dot(const WT* w, int64_t K, const float* x, int64_t B, int64_t /*kblock*/, float* out) {
  for (int64_t b = 0; b < B; ++b) {
    float s[R] = {};
    for (int64_t k = 0; k < K; ++k) {
      const float xv = x[b * K + k];
      for (int r = 0; r < R; ++r) s[r] += load_scalar(w + r * K + k) * xv;
    }
    for (int r = 0; r < R; ++r) out[b * R + r] = s[r];
  }
}

#endif

// y[b, n] for n in [n0, n1); OT is the output element type.
template <typename WT, typename OT>
void gemm_rows(const WT* w, const float* x, const float* bias, OT* y, int64_t B, int64_t N, int64_t K,
               int64_t n0, int64_t n1) {
  constexpr int R = Simd::kRows;
  // K block: R weight rows + kChunk x rows per pass must sit in L1 (~48 KB); when one chunk covers
  // the whole batch nothing is re-read, so the block can be all of K.
  const int64_t chunks = (B + 3) / 4;
  int64_t kblock = chunks == 1 ? K : 512;
  kblock = std::max<int64_t>(Simd::kLanes, kblock - kblock % Simd::kLanes);
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
    rows_dot<WT, R>(w + n * K, K, x, B, kblock, out);
    emit(n, R);
  }
  for (; n < n1; ++n) {
    rows_dot<WT, 1>(w + n * K, K, x, B, kblock, out);
    emit(n, 1);
  }
}

template <typename WT, typename OT>
void gemm(const WT* w, const float* x, const float* bias, OT* y, int64_t B, int64_t N, int64_t K) {
  constexpr int R = Simd::kRows;
  const int64_t groups = (N + R - 1) / R;
  // Give each task at least ~128 KB of weights: below that, waking threads costs more than it saves.
  const int64_t group_bytes = R * K * static_cast<int64_t>(sizeof(WT));
  const int64_t grain = std::max<int64_t>(1, (128 << 10) / std::max<int64_t>(1, group_bytes));
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    gemm_rows<WT, OT>(w, x, bias, y, B, N, K, g0 * R, std::min(N, g1 * R));
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
