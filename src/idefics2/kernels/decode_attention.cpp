// Attention for one new token per row (decoding), one op instead of about fifteen: RoPE on q and k, k and v
// written into the preallocated cache at each row's position, then softmax(q k^T * scale) v over the keys the
// row may see, for grouped key/value heads. At decode time the attention itself is a few microseconds of
// arithmetic; what the op saves is the per-op overhead of the torch version (views, copies, sdpa's set-up),
// which is milliseconds per token over a whole decoder.
//
// Roundings follow the torch ops it replaces: RoPE rounds each product and the sum to the activation dtype
// (as `x * cos + rotate_half(x) * sin` does); scores, the softmax and the weighted sum are float32, and with
// bf16 activations the unnormalised probabilities are rounded to bf16 before they weight v, as torch's CPU
// flash attention does; the output is rounded once.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__) && \
    !defined(CPU_CAPABILITY_AVX512)
#define CPU_CAPABILITY_AVX512  // ATen's 512-bit Vectorized<float> (exp_u20 as in torch's CPU flash attention)
#endif
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>

#include "bf16.h"
#include "rope.h"
#include "check.h"
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <algorithm>
#include <vector>

namespace {


template <typename T>
inline void widen(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
using idefics2_kernels::load16;  // 16 fp32 / bf16 values as fp32 lanes (bf16.h)
#endif

// s[g] = <q_g, k> for the G query heads sharing one key (the key row is read once, widened in registers).
template <typename T>
inline void dots(const float* q, const T* k, int64_t G, int64_t D, float* s) {
#if defined(__AVX512F__)
  if (D % 16 == 0) {
    int64_t g = 0;
    for (; g + 4 <= G; g += 4) {
      const float* q0 = q + g * D;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t d = 0; d < D; d += 16) {
        const __m512 kv = load16(k + d);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + d), kv, a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + D + d), kv, a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + 2 * D + d), kv, a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + 3 * D + d), kv, a3);
      }
      s[g] = _mm512_reduce_add_ps(a0), s[g + 1] = _mm512_reduce_add_ps(a1);
      s[g + 2] = _mm512_reduce_add_ps(a2), s[g + 3] = _mm512_reduce_add_ps(a3);
    }
    for (; g < G; ++g) {
      __m512 a = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * D + d), load16(k + d), a);
      s[g] = _mm512_reduce_add_ps(a);
    }
    return;
  }
#endif
  for (int64_t g = 0; g < G; ++g) {
    float sum = 0.f;
    for (int64_t d = 0; d < D; ++d) sum += q[g * D + d] * static_cast<float>(k[d]);
    s[g] = sum;
  }
}

#if defined(__AVX512F__)
template <int V, typename T>  // D = 16 * V, the accumulator in V registers
inline void weighted_sum_regs(const float* p, int64_t n, const T* rows, float* out) {
  __m512 acc[V];
  for (int i = 0; i < V; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    if (p[j] == 0.f) continue;  // masked key
    const T* r = rows + j * 16 * V;
    const __m512 pj = _mm512_set1_ps(p[j]);
    for (int i = 0; i < V; ++i) acc[i] = _mm512_fmadd_ps(pj, load16(r + 16 * i), acc[i]);
  }
  for (int i = 0; i < V; ++i) _mm512_storeu_ps(out + 16 * i, acc[i]);
}
#endif

// out[0..D) = sum_j p[j] * rows[j, 0..D) over n contiguous rows.
template <typename T>
inline void weighted_sum(const float* p, int64_t n, int64_t D, const T* rows, float* out) {
#if defined(__AVX512F__)
  if (D == 64) return weighted_sum_regs<4>(p, n, rows, out);
  if (D == 128) return weighted_sum_regs<8>(p, n, rows, out);
  if (D == 256) return weighted_sum_regs<16>(p, n, rows, out);
#endif
  std::fill(out, out + D, 0.f);
  for (int64_t j = 0; j < n; ++j) {
    if (p[j] == 0.f) continue;
    for (int64_t d = 0; d < D; ++d) out[d] += p[j] * static_cast<float>(rows[j * D + d]);
  }
}

// In place: p[j] = exp(p[j] - max) over n scores (masked ones are -inf and become 0); returns their sum.
inline float softmax_numerators(float* p, int64_t n) {
  using Vec = at::vec::Vectorized<float>;
  float mx = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  if (n >= Vec::size()) {
    Vec vm(mx);
    for (; j + Vec::size() <= n; j += Vec::size()) vm = at::vec::maximum(vm, Vec::loadu(p + j));
    float lanes[Vec::size()];
    vm.store(lanes);
    for (int64_t i = 0; i < Vec::size(); ++i) mx = std::max(mx, lanes[i]);
  }
  for (; j < n; ++j) mx = std::max(mx, p[j]);
  if (mx == -std::numeric_limits<float>::infinity()) {  // no visible key: zeros (as torch >= 2.5's sdpa)
    std::fill(p, p + n, 0.f);
    return 0.f;
  }
  const Vec vmax(mx);
  Vec vsum(0.f);
  j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec e = (Vec::loadu(p + j) - vmax).exp_u20();
    e.store(p + j);
    vsum = vsum + e;
  }
  float lanes[Vec::size()];
  vsum.store(lanes);
  float sum = 0.f;
  for (int64_t i = 0; i < Vec::size(); ++i) sum += lanes[i];
  for (; j < n; ++j) {
    p[j] = std::exp(p[j] - mx);
    sum += p[j];
  }
  return sum;
}

template <typename T>
void decode_attention_impl(const T* q, const T* k, const T* v, const T* cos, const T* sin, T* key_cache,
                           T* value_cache, const int64_t* pos, const bool* valid, int64_t valid_row_stride,
                           int64_t valid_stride, T* out, int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t cap,
                           int64_t kv_len, float scale) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hkv; ++h) {
      const int64_t at = ((b * Hkv + h) * cap + pos[b]) * D;
      idefics2_kernels::rope_vector(k + (b * Hkv + h) * D, cos + b * D, sin + b * D, key_cache + at, D);
      for (int64_t d = 0; d < D; ++d) value_cache[at + d] = v[(b * Hkv + h) * D + d];
    }
  const int64_t G = Hq / Hkv;
  constexpr bool kReduced = !std::is_same<T, float>::value;
  // One (row, key/value head) pair is 2 * G * D * kv_len multiply-adds: a short step runs on the calling
  // thread (waking the pool costs more than it saves), a long or batched one is shared out.
  const int64_t grain = std::max<int64_t>(1, 262144 / std::max<int64_t>(1, 2 * G * D * kv_len));
  at::parallel_for(0, B * Hkv, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> roped(static_cast<size_t>(D));
    std::vector<float> qf(static_cast<size_t>(G * D)), acc(static_cast<size_t>(G * D));
    std::vector<float> scores(static_cast<size_t>(G * kv_len)), sum(static_cast<size_t>(G)), s(static_cast<size_t>(G));
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / Hkv, h = i % Hkv;
      for (int64_t g = 0; g < G; ++g) {  // the query heads that share key/value head h
        idefics2_kernels::rope_vector(q + (b * Hq + h * G + g) * D, cos + b * D, sin + b * D, roped.data(), D);
        widen(roped.data(), qf.data() + g * D, D);
      }
      const T* K = key_cache + (b * Hkv + h) * cap * D;
      const T* V = value_cache + (b * Hkv + h) * cap * D;
      const bool* m = valid ? valid + b * valid_row_stride : nullptr;
      const int64_t keys = std::min(kv_len, pos[b] + 1);  // causal: up to the row's own position
      for (int64_t j = 0; j < keys; ++j) {  // scores [G, keys]
        if (m && !m[j * valid_stride]) {
          for (int64_t g = 0; g < G; ++g) scores[g * kv_len + j] = -std::numeric_limits<float>::infinity();
          continue;
        }
        dots(qf.data(), K + j * D, G, D, s.data());
        for (int64_t g = 0; g < G; ++g) scores[g * kv_len + j] = s[g] * scale;
      }
      for (int64_t g = 0; g < G; ++g) {
        float* p = scores.data() + g * kv_len;
        sum[g] = softmax_numerators(p, keys);
        if constexpr (kReduced)  // torch's flash attention weights v with bf16 probabilities
          for (int64_t j = 0; j < keys; ++j) p[j] = static_cast<float>(static_cast<T>(p[j]));
      }
      for (int64_t g = 0; g < G; ++g) weighted_sum(scores.data() + g * kv_len, keys, D, V, acc.data() + g * D);
      for (int64_t g = 0; g < G; ++g) {
        // a row that may see no key gets zeros (torch >= 2.5's sdpa does the same)
        const float inv = sum[g] > 0.f ? 1.f / sum[g] : 0.f;
        T* o = out + (b * Hq + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[g * D + d] * inv);
      }
    }
  });
}

// q [B, 1, Hq * D], k and v [B, 1, Hkv * D] (the projections, before RoPE), cos/sin [B, 1, D], key/value cache
// [B, Hkv, capacity, D] (written at [b, :, positions[b]]), positions int64 [B]; key_valid: optional bool
// [B or 1, 1, 1, kv_len] (the decoder's attention mask: padding, sliding window); keys j <= positions[b] and
// j < kv_len are seen. Returns [B, 1, Hq * D].
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                            const at::Tensor& sin, at::Tensor key_cache, at::Tensor value_cache,
                            const at::Tensor& positions, const c10::optional<at::Tensor>& key_valid, int64_t kv_len,
                            double scale) {
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "decode_attention: fp32 or bf16");
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.is_contiguous() && value_cache.is_contiguous() &&
                  value_cache.sizes() == key_cache.sizes(), "decode_attention: contiguous caches [B, Hkv, cap, D]");
  const int64_t B = key_cache.size(0), Hkv = key_cache.size(1), cap = key_cache.size(2), D = key_cache.size(3);
  TORCH_CHECK(q.numel() % (B * D) == 0 && (q.numel() / (B * D)) % Hkv == 0, "decode_attention: q heads");
  const int64_t Hq = q.numel() / (B * D);
  TORCH_CHECK(q.size(0) == B && k.numel() == B * Hkv * D && v.numel() == B * Hkv * D, "decode_attention: shapes");
  TORCH_CHECK(cos.numel() == B * D && sin.numel() == B * D, "decode_attention: cos/sin [B, 1, D]");
  const std::initializer_list<const at::Tensor*> inputs = {&k, &v, &cos, &sin, &key_cache, &value_cache};
  for (const at::Tensor* t : inputs)
    TORCH_CHECK(t->scalar_type() == dtype && t->device().is_cpu(), "decode_attention: CPU tensors of one dtype");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.numel() == B, "decode_attention: int64 positions [B]");
  const at::Tensor pos = positions.contiguous();
  const int64_t* p = pos.data_ptr<int64_t>();
  IDEFICS2_CHECK(kv_len >= 1 && kv_len <= cap, "decode_attention: kv_len %lld outside the capacity %lld",
                 static_cast<long long>(kv_len), static_cast<long long>(cap));
  for (int64_t b = 0; b < B; ++b)
    IDEFICS2_CHECK(p[b] >= 0 && p[b] < kv_len, "decode_attention: position %lld outside the %lld keys",
                   static_cast<long long>(p[b]), static_cast<long long>(kv_len));
  const bool* valid = nullptr;
  int64_t row_stride = 0, stride = 1;
  if (key_valid.has_value()) {
    const at::Tensor& mask = *key_valid;
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 4 && (mask.size(0) == 1 || mask.size(0) == B) &&
                    mask.size(1) == 1 && mask.size(2) == 1 && mask.size(3) == kv_len,
                "decode_attention: key_valid bool [B or 1, 1, 1, kv_len]");
    valid = mask.data_ptr<bool>();
    row_stride = mask.size(0) == 1 ? 0 : mask.stride(0);
    stride = mask.stride(3);
  }
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), cc = cos.contiguous(),
                   sc = sin.contiguous();
  at::Tensor out = at::empty({B, 1, Hq * D}, q.options());
  const float s = static_cast<float>(scale);
  if (dtype == at::kFloat) {
    decode_attention_impl<float>(qc.data_ptr<float>(), kc.data_ptr<float>(), vc.data_ptr<float>(), cc.data_ptr<float>(),
                                 sc.data_ptr<float>(), key_cache.data_ptr<float>(), value_cache.data_ptr<float>(), p,
                                 valid, row_stride, stride, out.data_ptr<float>(), B, Hq, Hkv, D, cap, kv_len, s);
  } else {
    using bf = c10::BFloat16;
    decode_attention_impl<bf>(qc.data_ptr<bf>(), kc.data_ptr<bf>(), vc.data_ptr<bf>(), cc.data_ptr<bf>(),
                              sc.data_ptr<bf>(), key_cache.data_ptr<bf>(), value_cache.data_ptr<bf>(), p, valid,
                              row_stride, stride, out.data_ptr<bf>(), B, Hq, Hkv, D, cap, kv_len, s);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(idefics2_kernels, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(a!) key_cache, "
        "Tensor(b!) value_cache, Tensor positions, Tensor? key_valid, int kv_len, float scale) -> Tensor",
        &decode_attention);
}
