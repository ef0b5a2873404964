// Dropout whose mask is a pure function of (seed, element index), so training can regenerate it in the
// backward pass instead of storing it (torch's CPU dropout keeps a float noise tensor per call, and its
// bernoulli_ draws dominated the LoRA step: ~20% of the time). Bit-identical to the torch-op version in
// idefics2/kernels/__init__.py (`seeded_dropout`), which other devices and kernel-less installs use.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>

namespace {

// A 32-bit integer hash with full avalanche (a bijection on uint32).
inline uint32_t mix32(uint32_t x) {
  x = ((x >> 16) ^ x) * 0x45d9f3bu;
  x = ((x >> 16) ^ x) * 0x45d9f3bu;
  return (x >> 16) ^ x;
}

template <typename T>
void dropout_loop(const T* x, T* out, int64_t n, uint32_t seed_a, uint32_t seed_b, uint64_t threshold, float scale) {
  at::parallel_for(0, n, 1 << 15, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint32_t u = mix32(mix32(static_cast<uint32_t>(i) + seed_a) ^ seed_b);
      const float kept = static_cast<float>(x[i]) * scale;
      out[i] = static_cast<uint64_t>(u) >= threshold ? static_cast<T>(kept) : static_cast<T>(0.0f);
    }
  });
}

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
  const auto a = static_cast<uint32_t>(seed_a), b = static_cast<uint32_t>(seed_b);
  const auto t = static_cast<uint64_t>(threshold);
  const auto s = static_cast<float>(scale);
  switch (x.scalar_type()) {
    case at::kFloat:
      dropout_loop(xc.data_ptr<float>(), out.data_ptr<float>(), xc.numel(), a, b, t, s);
      break;
    case at::kBFloat16:
      dropout_loop(xc.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(), xc.numel(), a, b, t, s);
      break;
    default:
      dropout_loop(xc.data_ptr<at::Half>(), out.data_ptr<at::Half>(), xc.numel(), a, b, t, s);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(idefics2_kernels, m) {
  m.def("seeded_dropout(Tensor x, int threshold, float scale, int seed_a, int seed_b) -> Tensor", &seeded_dropout);
}
