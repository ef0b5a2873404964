// One Mistral decoder layer for a decoding step (one new token per row), as one op:
//   h = rms_norm(x); q, k, v = h W_qkv; a = decode_attention(q, k, v); x = x + a W_o;
//   h = rms_norm(x); g, u = h W_gate_up; x = x + (silu(g) * u) W_down
// It runs exactly the ops the Python layer runs (the same kernels through the dispatcher, ATen's add, and
// silu * mul as GatedMLP does it), so results are bit-identical; what it removes is the Python between them: about 250 us per layer
// per step, milliseconds per token over a decoder, a large share of a quantized model's step.
//
// Weights come as lists by kind: 0 float ([W] per projection), 1 int8 ([qweights..., fp32 scales...]),
// 2 int4 ([qweights..., scales..., zeros...], `group` along K). q/k/v and gate/up are each one list of projections.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <vector>

namespace {

enum Kind : int64_t { kFloat = 0, kInt8 = 1, kInt4 = 2 };
constexpr int64_t kFp32MinRows = 3;  // as idefics2.kernels.FP32_MIN_ROWS: MKL's gemv below that

c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, double)>& rms_norm_op() {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("idefics2_kernels::rms_norm", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double)>();
  return op;
}

// silu(gate) * up as layers.GatedMLP computes it at inference: the one-pass kernel (activation.cpp) where it is
// built (AVX-512, as every kernel here), torch's silu and mul elsewhere
at::Tensor silu_times(const at::Tensor& gate, const at::Tensor& up) {
#if defined(__AVX512F__)
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("idefics2_kernels::silu_mul_", "")
                       .typed<at::Tensor(at::Tensor, const at::Tensor&)>();
  if (gate.is_contiguous() && up.is_contiguous() && gate.sizes() == up.sizes() &&
      gate.scalar_type() == up.scalar_type())
    return op.call(gate, up);
#endif
  return at::silu(gate) * up;
}

std::vector<at::Tensor> float_linears(const at::Tensor& x, at::TensorList weights) {
  // idefics2.kernels.small_batch_linear(s): fp32 at 1-2 rows stays with F.linear
  if (weights[0].scalar_type() == at::kFloat && x.size(0) < kFp32MinRows) {
    std::vector<at::Tensor> ys;
    for (const auto& w : weights) ys.push_back(at::linear(x, w));
    return ys;
  }
  if (weights.size() == 1) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("idefics2_kernels::small_gemm", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>();
    return {op.call(x, weights[0], std::nullopt)};
  }
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("idefics2_kernels::small_gemm_multi", "")
                       .typed<std::vector<at::Tensor>(const at::Tensor&, at::TensorList)>();
  return op.call(x, weights);
}

// The projections of one list (1-3 of them) applied to x [B, K]; outputs in x's dtype.
std::vector<at::Tensor> linears(const at::Tensor& x, int64_t kind, at::TensorList w, int64_t group) {
  if (kind == kFloat) return float_linears(x, w);
  std::vector<at::Tensor> ys;
  if (kind == kInt8) {  // [q0, q1, ..., s0, s1, ...]: one call for all
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("idefics2_kernels::small_gemm_int8_multi", "")
                         .typed<std::vector<at::Tensor>(const at::Tensor&, at::TensorList, at::TensorList)>();
    const size_t n = w.size() / 2;
    ys = op.call(x, w.slice(0, n), w.slice(n, n));
  } else {  // int4: [qweights..., scales..., zeros...]: one call for all
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("idefics2_kernels::small_gemm_int4", "")
                         .typed<std::vector<at::Tensor>(const at::Tensor&, at::TensorList, at::TensorList,
                                                        at::TensorList, int64_t)>();
    const size_t n = w.size() / 3;
    ys = op.call(x, w.slice(0, n), w.slice(n, n), w.slice(2 * n, n), group);
  }
  for (auto& y : ys) y = y.to(x.scalar_type());
  return ys;
}

at::Tensor decode_layer(const at::Tensor& x, const at::Tensor& ln1, const at::Tensor& ln2, double eps, int64_t kind,
                        at::TensorList qkv, at::TensorList o, at::TensorList gate_up, at::TensorList down,
                        int64_t group, const at::Tensor& cos, const at::Tensor& sin, at::Tensor key_cache,
                        at::Tensor value_cache, const at::Tensor& positions, const c10::optional<at::Tensor>& key_valid,
                        int64_t kv_len, double scale) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1, "decode_layer: x [B, 1, H]");
  TORCH_CHECK(kind == kFloat || kind == kInt8 || kind == kInt4, "decode_layer: kind 0 (float), 1 (int8), 2 (int4)");
  const int64_t per = kind == kFloat ? 1 : (kind == kInt8 ? 2 : 3);
  TORCH_CHECK(qkv.size() == size_t(3 * per) && o.size() == size_t(per) && gate_up.size() == size_t(2 * per) &&
                  down.size() == size_t(per), "decode_layer: weight lists do not match the kind");
  static auto attention = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("idefics2_kernels::decode_attention", "")
                              .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&, at::Tensor, at::Tensor,
                                                const at::Tensor&, const c10::optional<at::Tensor>&, int64_t, double)>();
  const int64_t B = x.size(0), H = x.size(2);
  const at::Tensor x2 = x.reshape({B, H});
  const auto qkv_out = linears(rms_norm_op().call(x2, ln1, eps), kind, qkv, group);
  const at::Tensor a = attention.call(qkv_out[0], qkv_out[1], qkv_out[2], cos, sin, key_cache, value_cache,
                                      positions, key_valid, kv_len, scale);
  const at::Tensor h = x2 + linears(a.reshape({B, -1}), kind, o, group)[0];
  const auto gu = linears(rms_norm_op().call(h, ln2, eps), kind, gate_up, group);
  const at::Tensor out = h + linears(silu_times(gu[0], gu[1]), kind, down, group)[0];
  return out.reshape({B, 1, H});
}

// All the decoder's layers for one decoding step, one after the other in one op: the layers' lists concatenated
// (layer i's q/k/v are qkv[i * 3 * per, ...), per as in decode_layer), one norm weight and one key / value cache
// per layer. Saves the Python call of each layer (its arguments converted one by one: tens of microseconds).
at::Tensor decode_layers(const at::Tensor& x, at::TensorList ln1, at::TensorList ln2, double eps, int64_t kind,
                         at::TensorList qkv, at::TensorList o, at::TensorList gate_up, at::TensorList down,
                         int64_t group, const at::Tensor& cos, const at::Tensor& sin, at::TensorList key_caches,
                         at::TensorList value_caches, const at::Tensor& positions,
                         const c10::optional<at::Tensor>& key_valid, int64_t kv_len, double scale) {
  const size_t layers = ln1.size();
  const size_t per = kind == kFloat ? 1 : (kind == kInt8 ? 2 : 3);
  TORCH_CHECK(ln2.size() == layers && key_caches.size() == layers && value_caches.size() == layers &&
                  qkv.size() == 3 * per * layers && o.size() == per * layers && gate_up.size() == 2 * per * layers &&
                  down.size() == per * layers, "decode_layers: one norm, cache and weight list per layer");
  at::Tensor h = x;
  for (size_t i = 0; i < layers; ++i)
    h = decode_layer(h, ln1[i], ln2[i], eps, kind, qkv.slice(3 * per * i, 3 * per), o.slice(per * i, per),
                     gate_up.slice(2 * per * i, 2 * per), down.slice(per * i, per), group, cos, sin, key_caches[i],
                     value_caches[i], positions, key_valid, kv_len, scale);
  return h;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(idefics2_kernels, m) {
  m.def("decode_layer(Tensor x, Tensor ln1, Tensor ln2, float eps, int kind, Tensor[] qkv, Tensor[] o, "
        "Tensor[] gate_up, Tensor[] down, int group, Tensor cos, Tensor sin, Tensor(a!) key_cache, "
        "Tensor(b!) value_cache, Tensor positions, Tensor? key_valid, int kv_len, float scale) -> Tensor",
        &decode_layer);
  m.def("decode_layers(Tensor x, Tensor[] ln1, Tensor[] ln2, float eps, int kind, Tensor[] qkv, Tensor[] o, "
        "Tensor[] gate_up, Tensor[] down, int group, Tensor cos, Tensor sin, Tensor(a!)[] key_caches, "
        "Tensor(b!)[] value_caches, Tensor positions, Tensor? key_valid, int kv_len, float scale) -> Tensor",
        &decode_layers);
}
