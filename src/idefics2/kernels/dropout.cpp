// Dropout whose mask is a pure function of (seed, element index), so training can regenerate it in the
// backward pass instead of storing it (torch's CPU dropout keeps a float noise tensor per call, and its
// bernoulli_ draws dominated the LoRA step: ~20% of the time). Bit-identical to the torch-op version in
// idefics2/kernels/__init__.py (`seeded_dropout`), which other devices and kernel-less installs use.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include "check.h"

#include <algorithm>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

// A 32-bit integer hash with full avalanche (a bijection on uint32).
inline uint32_t mix32(uint32_t x) {
  x = ((x >> 16) ^ x) * 0x45d9f3bu;
  x = ((x >> 16) ^ x) * 0x45d9f3bu;
  return (x >> 16) ^ x;
}

// The dropout mask of element i (row-major over the whole tensor): kept where hash(seeds, i) >= threshold.
struct Mask {
  uint32_t a, b;
  uint64_t threshold;
  float scale;
  static Mask of(int64_t threshold, double scale, int64_t seed_a, int64_t seed_b) {
    return {static_cast<uint32_t>(seed_a), static_cast<uint32_t>(seed_b), static_cast<uint64_t>(threshold),
            static_cast<float>(scale)};
  }
  // out[k] = dropped x[k] for the K elements starting at flat index `base`
  template <typename T>
  void apply(const T* x, T* out, int64_t base, int64_t K) const {
    if (threshold > 0xffffffffu) {  // p = 1: everything dropped
      std::fill(out, out + K, static_cast<T>(0.0f));
      return;
    }
    // locals: out may be a float*, so writes through it could alias the members and would block vectorisation
    const uint32_t t = static_cast<uint32_t>(threshold), sa = static_cast<uint32_t>(base) + a, sb = b;
    const float s = scale;
    for (int64_t k = 0; k < K; ++k) {
      const uint32_t u = mix32(mix32(sa + static_cast<uint32_t>(k)) ^ sb);
      out[k] = u >= t ? static_cast<T>(static_cast<float>(x[k]) * s) : static_cast<T>(0.0f);
    }
  }
};

// out[i] = x[i] * scale where hash(seed, i) >= threshold (i over x's elements in row-major order), else 0.
// threshold = round(p * 2^32): each element is dropped with probability p (to 2^-32).
at::Tensor seeded_dropout(const at::Tensor& x, int64_t threshold, double scale, int64_t seed_a, int64_t seed_b) {
  TORCH_CHECK(x.device().is_cpu(), "seeded_dropout: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "seeded_dropout: float32, bfloat16 or float16 input");
  TORCH_CHECK(x.numel() <= (int64_t{1} << 32), "seeded_dropout: at most 2^32 elements");
  TORCH_CHECK(threshold >= 0 && threshold <= (int64_t{1} << 32), "seeded_dropout: threshold in [0, 2^32]");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  const Mask mask = Mask::of(threshold, scale, seed_a, seed_b);
  auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* xp = xc.data_ptr<T>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, xc.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
      mask.apply(xp + begin, op + begin, begin, end - begin);
    });
  };
  switch (x.scalar_type()) {
    case at::kFloat: run(static_cast<float*>(nullptr)); break;
    case at::kBFloat16: run(static_cast<at::BFloat16*>(nullptr)); break;
    default: run(static_cast<at::Half*>(nullptr));
  }
  return out;
}

// ---- LoRA's down-projection with the dropout fused in: F.linear(seeded_dropout(x), w) and its gradients,
// fp32, without materialising the dropped x (a transient the size of the input per adapter call, which also
// fragments the heap between the activations autograd keeps). Rows of x are masked into a per-thread buffer
// of K floats; w is [R, K] with small R (the LoRA rank).

// out[j] = dot(v, w[j]) for j < R: 8 rows of w at a time against one load of v (AVX-512).
inline void dots(const float* v, const float* w, int64_t K, int64_t R, float* out) {
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j + 8 <= R; j += 8) {
    __m512 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      const __m512 vv = _mm512_loadu_ps(v + k);
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) acc[i] = _mm512_fmadd_ps(vv, _mm512_loadu_ps(w + (j + i) * K + k), acc[i]);
    }
    for (int i = 0; i < 8; ++i) {
      float s = _mm512_reduce_add_ps(acc[i]);
      for (int64_t kk = k; kk < K; ++kk) s += v[kk] * w[(j + i) * K + kk];
      out[j + i] = s;
    }
  }
#endif
  for (; j < R; ++j) {
    float s = 0.0f;
    for (int64_t k = 0; k < K; ++k) s += v[k] * w[j * K + k];
    out[j] = s;
  }
}

void check_lora_operands(const at::Tensor& x, const at::Tensor& w, const char* name) {
  IDEFICS2_CHECK(x.device().is_cpu() && w.device().is_cpu(), "%s: CPU tensors only", name);
  IDEFICS2_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "%s: float32 x and weight", name);
  IDEFICS2_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) && x.is_contiguous() && w.is_contiguous(),
                 "%s: contiguous x [N, K] and weight [R, K]", name);
  IDEFICS2_CHECK(x.numel() <= (int64_t{1} << 32), "%s: at most 2^32 elements", name);
}

void check_grad(const at::Tensor& grad, int64_t rows, int64_t rank, const char* name) {
  IDEFICS2_CHECK(grad.scalar_type() == at::kFloat && grad.is_contiguous() && grad.dim() == 2 && grad.size(0) == rows &&
                     grad.size(1) == rank, "%s: contiguous float32 grad [N, R]", name);
}

// Rows per task: ~32K elements of x.
inline int64_t row_grain(int64_t K) { return std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, K)); }

// out[n, j] = sum_k dropped(x)[n, k] * w[j, k]
at::Tensor dropout_linear(const at::Tensor& x, const at::Tensor& w, int64_t threshold, double scale, int64_t seed_a,
                          int64_t seed_b) {
  check_lora_operands(x, w, "dropout_linear");
  const int64_t N = x.size(0), K = x.size(1), R = w.size(0);
  const Mask mask = Mask::of(threshold, scale, seed_a, seed_b);
  at::Tensor out = at::empty({N, R}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, row_grain(K), [&](int64_t n0, int64_t n1) {
    std::vector<float> buf(static_cast<size_t>(K));
    for (int64_t n = n0; n < n1; ++n) {
      mask.apply(xp + n * K, buf.data(), n * K, K);
      dots(buf.data(), wp, K, R, op + n * R);
    }
  });
  return out;
}

// grad_x[n, k] = mask[n, k] * scale * sum_j grad[n, j] * w[j, k]   (dropout is linear: the same masked scaling)
at::Tensor dropout_linear_grad_input(const at::Tensor& grad, const at::Tensor& w, int64_t threshold, double scale,
                                     int64_t seed_a, int64_t seed_b) {
  check_grad(grad, grad.size(0), w.size(0), "dropout_linear_grad_input");
  const int64_t N = grad.size(0), K = w.size(1), R = w.size(0);
  at::Tensor out = at::empty({N, K}, grad.options());
  check_lora_operands(out, w, "dropout_linear_grad_input");
  const Mask mask = Mask::of(threshold, scale, seed_a, seed_b);
  const float *gp = grad.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, row_grain(K), [&](int64_t n0, int64_t n1) {
    std::vector<float> buf(static_cast<size_t>(K));
    float* __restrict b = buf.data();
    for (int64_t n = n0; n < n1; ++n) {
      const float* g = gp + n * R;
      int64_t k = 0;
#if defined(__AVX512F__)
      for (; k + 16 <= K; k += 16) {  // the R terms of each element summed in order
        __m512 acc = _mm512_setzero_ps();
        for (int64_t j = 0; j < R; ++j) acc = _mm512_fmadd_ps(_mm512_set1_ps(g[j]), _mm512_loadu_ps(wp + j * K + k), acc);
        _mm512_storeu_ps(b + k, acc);
      }
#endif
      for (; k < K; ++k) {
        float acc = 0.0f;
        for (int64_t j = 0; j < R; ++j) acc += g[j] * wp[j * K + k];
        b[k] = acc;
      }
      mask.apply(b, op + n * K, n * K, K);
    }
  });
  return out;
}

// grad_w[j, k] = sum_n grad[n, j] * dropped(x)[n, k]; threads split K, so each column sums its rows in order.
at::Tensor dropout_linear_grad_weight(const at::Tensor& grad, const at::Tensor& x, int64_t threshold, double scale,
                                      int64_t seed_a, int64_t seed_b) {
  check_grad(grad, x.size(0), grad.size(1), "dropout_linear_grad_weight");
  const int64_t N = x.size(0), K = x.size(1), R = grad.size(1);
  at::Tensor out = at::zeros({R, K}, x.options());
  check_lora_operands(x, out, "dropout_linear_grad_weight");
  const Mask mask = Mask::of(threshold, scale, seed_a, seed_b);
  const float *gp = grad.data_ptr<float>(), *xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  constexpr int64_t kCols = 256;
  at::parallel_for(0, (K + kCols - 1) / kCols, 1, [&](int64_t c0, int64_t c1) {
    const int64_t k0 = c0 * kCols, k1 = std::min(K, c1 * kCols), len = k1 - k0;
    std::vector<float> buf(static_cast<size_t>(len));
    for (int64_t n = 0; n < N; ++n) {
      mask.apply(xp + n * K + k0, buf.data(), n * K + k0, len);
      for (int64_t j = 0; j < R; ++j) {
        const float g = gp[n * R + j];
        float* orow = op + j * K + k0;
#pragma omp simd
        for (int64_t k = 0; k < len; ++k) orow[k] += g * buf[k];
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(idefics2_kernels, m) {
  m.def("seeded_dropout(Tensor x, int threshold, float scale, int seed_a, int seed_b) -> Tensor", &seeded_dropout);
  m.def("dropout_linear(Tensor x, Tensor w, int threshold, float scale, int seed_a, int seed_b) -> Tensor",
        &dropout_linear);
  m.def("dropout_linear_grad_input(Tensor grad, Tensor w, int threshold, float scale, int seed_a, int seed_b) -> Tensor",
        &dropout_linear_grad_input);
  m.def("dropout_linear_grad_weight(Tensor grad, Tensor x, int threshold, float scale, int seed_a, int seed_b) -> Tensor",
        &dropout_linear_grad_weight);
}
