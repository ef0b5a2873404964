"""Mistral text decoder (`model.text_model.*`): RoPE, grouped-query attention, sliding window, SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .cache import KVCache
from .config import MistralTextConfig
from .layers import GatedMLP, Linear, RMSNorm, add_residual, attention, parallel_linears
from .quantize import QuantizedLinear


class RotaryEmbedding(nn.Module):
    """Non-interleaved ("rotate_half") RoPE; angles in float32, cos/sin cast to the activation dtype."""

    def __init__(self, config: MistralTextConfig) -> None:
        super().__init__()
        dim = config.head_dim
        # Computed on the CPU, then kept on the device the model is built on (`with torch.device("cuda"): ...`),
        # except the meta device: it is not in checkpoints, so a model built there still needs real values.
        steps = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float()
        inv_freq = 1.0 / (config.rope_theta ** (steps / dim))
        if torch.get_default_device().type != "meta":
            inv_freq = inv_freq.to(torch.get_default_device())
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids.float()[..., None] * self.inv_freq.float()  # [B, T, D/2]
        angles = torch.cat([freqs, freqs], dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [B, T, D]."""
    fused = kernels.rope(x, cos, sin)  # decoding: one op instead of about ten
    if fused is not None:
        return fused
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def causal_mask(
    attention_mask: torch.Tensor | None,
    q_len: int,
    past_len: int,
    sliding_window: int | None,
    device: torch.device,
    query_positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, bool]:
    """Boolean mask [B|1, 1, Q, K] over keys 0..past_len+Q-1 for the new queries.

    A query at cache position q sees key k iff k <= q, k > q - sliding_window (exactly `sliding_window` keys
    including itself), and the key is not padding. Queries sit at past_len.. unless `query_positions`
    [B, Q] says otherwise (a slot cache, where rows have different lengths). Returns (None, is_causal)
    when no explicit mask is needed, so sdpa can take its fast causal path.
    """
    kv_len = past_len + q_len
    if attention_mask is not None:
        if attention_mask.shape[-1] < kv_len:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} positions but the cache plus the new tokens "
                f"hold {kv_len}; pass a mask over past and new tokens"
            )
        attention_mask = attention_mask[:, :kv_len].bool()
        if query_positions is None and bool(attention_mask.all()):
            attention_mask = None
    window_active = sliding_window is not None and kv_len > sliding_window
    if attention_mask is None and query_positions is None and not window_active:
        if q_len == 1:
            return None, False
        if past_len == 0:
            return None, True
    if query_positions is None:
        query_positions = torch.arange(past_len, kv_len, device=device)[None, :]
    q_pos = query_positions[:, None, :, None]  # [B|1, 1, Q, 1]
    k_pos = torch.arange(kv_len, device=device)
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed = allowed & (k_pos > q_pos - sliding_window)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :]
    return allowed, False


def default_position_ids(
    attention_mask: torch.Tensor | None, batch: int, q_len: int, past_len: int, device: torch.device
) -> torch.Tensor:
    """Positions that follow the attention mask (left padding does not shift them), so a padded row gets
    exactly the positions it would get alone. Pads get 0; they are masked anyway."""
    if attention_mask is None:
        return torch.arange(past_len, past_len + q_len, device=device).unsqueeze(0).expand(batch, -1)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return positions[:, past_len : past_len + q_len].to(device)


class MistralAttention(nn.Module):
    def __init__(self, config: MistralTextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.attn_implementation = "sdpa"
        d = config.hidden_size
        self.q_proj = Linear(d, self.num_heads * self.head_dim, bias=False)
        self.k_proj = Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = Linear(self.num_heads * self.head_dim, d, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: KVCache | None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, _ = x.shape
        q, k, v = parallel_linears(x, self.q_proj, self.k_proj, self.v_proj)
        cos, sin = rope
        if (length == 1 and cache is not None and self.attn_implementation == "sdpa" and not output_attentions
                and not self.training
                and kernels.decode_attention_applies(q, cache.keys[self.layer_idx])):
            key_cache, value_cache, positions, kv_len = cache.decode_slot(self.layer_idx)
            out = kernels.decode_attention(q, k, v, cos, sin, key_cache, value_cache, positions, mask, kv_len,
                                           self.scale)
            return self.o_proj(out), None
        q = q.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out, weights = attention(
            q, k, v, mask, self.scale, self.attn_implementation, is_causal=is_causal,
            dropout=self.dropout if self.training else 0.0, return_weights=output_attentions,
        )
        return self.o_proj(out.reshape(batch, length, -1)), weights


class MistralDecoderLayer(nn.Module):
    def __init__(self, config: MistralTextConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MistralAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_size, config.hidden_act)

    def forward(self, x, rope, mask, is_causal, cache, output_attentions=False):
        if x.shape[1] == 1 and cache is not None and not output_attentions and not torch.is_grad_enabled():
            fused = self.fused_decode(x, rope, mask, cache)
            if fused is not None:
                return fused, None
        attn_out, weights = self.self_attn(self.input_layernorm(x), rope, mask, is_causal, cache, output_attentions)
        x = add_residual(x, attn_out, self.self_attn, self.self_attn.o_proj)
        return add_residual(x, self.mlp(self.post_attention_layernorm(x)), self.mlp, self.mlp.down_proj), weights

    def fused_decode(self, x, rope, mask, cache) -> torch.Tensor | None:
        """This layer for one decoding step as one compiled op (`kernels.decode_layer`: the same kernels, without
        the Python between them), or None where it does not apply: the caller runs the modules."""
        attn = self.self_attn
        if (attn.attn_implementation != "sdpa" or x.shape[0] > kernels.MAX_ROWS
                or not kernels.decode_attention_applies(x, cache.keys[attn.layer_idx])):
            return None
        # The weight lists are gathered once per cache (one generate call, one server run), not every step.
        plans = cache.decode_plans
        key = (attn.layer_idx, x.dtype)
        if key not in plans:
            plans[key] = decode_layer_weights(self, x.dtype)
        weights = plans[key]
        if weights is None:
            return None
        key_cache, value_cache, positions, kv_len = cache.decode_slot(attn.layer_idx)
        cos, sin = rope
        return kernels.decode_layer(x, self.input_layernorm.weight, self.post_attention_layernorm.weight,
                                    self.input_layernorm.eps, *weights, cos, sin, key_cache, value_cache, positions,
                                    mask, kv_len, attn.scale)


def decode_layer_weights(layer: MistralDecoderLayer, dtype: torch.dtype) -> tuple | None:
    """(kind, qkv, o, gate_up, down, group): the layer's weights as `kernels.decode_layer` takes them, or None
    where the layer is not the plain one the op reproduces (adapters, hooks, biases, other modules or dtypes)."""
    attn, mlp = layer.self_attn, layer.mlp
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    kind = type(projections[0])
    if (any(type(m) is not kind for m in projections) or any(type(m) is not RMSNorm for m in norms)
            or type(mlp) is not GatedMLP or mlp.act is not F.silu or norms[0].eps != norms[1].eps
            or any(m._forward_hooks or m._forward_pre_hooks for m in (layer, attn, mlp, *norms, *projections))):
        return None
    groups = (projections[:3], projections[3:4], projections[4:6], projections[6:])
    if kind is Linear:
        if any(m.bias is not None or m.weight.dtype != dtype or m.weight.device.type != "cpu"
               or not m.weight.is_contiguous() for m in projections):
            return None
        return (kernels.DECODE_FLOAT, *([m.weight for m in g] for g in groups), 0)
    if kind is QuantizedLinear:
        bits, group = projections[0].bits, projections[0].group_size
        if any(m.bits != bits or m.qweight.device.type != "cpu" or m.padded_rows != m.out_features
               for m in projections):
            return None
        if bits == 8:
            return (kernels.DECODE_INT8, *([m.qweight for m in g] + [m._fp32_scales() for m in g] for g in groups), 0)
        if any(m.group_size != group for m in projections) or not kernels.int4_kernel_available():
            return None
        return (kernels.DECODE_INT4, *([m.qweight for m in g] + [m.scales for m in g] + [m.zeros for m in g]
                                       for g in groups), group)
    return None


def decode_stack_weights(layers: nn.ModuleList, dtype: torch.dtype) -> tuple | None:
    """(ln1s, ln2s, eps, kind, qkv, o, gate_up, down, group, scale): every layer's `decode_layer_weights`
    concatenated for `kernels.decode_layers`, or None unless all layers are plain, of one kind, on the CPU."""
    plans = [decode_layer_weights(layer, dtype) for layer in layers]
    attns = [layer.self_attn for layer in layers]
    if (not plans or any(p is None for p in plans) or any(a.attn_implementation != "sdpa" for a in attns)
            or len({(p[0], p[5]) for p in plans}) != 1 or len({a.scale for a in attns}) != 1
            or len({layer.input_layernorm.eps for layer in layers}) != 1):  # (each plan is on the CPU already)
        return None
    kind, group = plans[0][0], plans[0][5]
    return ([layer.input_layernorm.weight for layer in layers], [layer.post_attention_layernorm.weight for layer in layers],
            layers[0].input_layernorm.eps, kind, *([t for p in plans for t in p[i]] for i in range(1, 5)), group,
            attns[0].scale)


class MistralModel(nn.Module):
    def __init__(self, config: MistralTextConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(MistralDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False

    def new_cache(self, batch_size: int, capacity: int, dtype: torch.dtype, device) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, batch_size, c.num_key_value_heads, c.head_dim, capacity, dtype, device)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        """Returns (last hidden state after the final norm, all hidden states, attention weights)."""
        batch, q_len, _ = inputs_embeds.shape
        past_len = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if cache is not None and cache.query_positions(q_len) is not None:
                raise ValueError("a slot cache needs explicit position_ids")
            position_ids = default_position_ids(attention_mask, batch, q_len, past_len, inputs_embeds.device)
        query_positions = cache.query_positions(q_len) if cache is not None else None
        mask, is_causal = causal_mask(attention_mask, q_len, past_len, self.config.sliding_window,
                                      inputs_embeds.device, query_positions)
        rope = self.rotary_emb(position_ids, inputs_embeds.dtype)

        if q_len == 1 and cache is not None and not (output_hidden_states or output_attentions):
            fused = self.fused_decode(inputs_embeds, rope, mask, cache)
            if fused is not None:
                return self.norm(fused), None, None
        hidden = inputs_embeds
        all_hidden: list[torch.Tensor] = []
        all_attn: list[torch.Tensor] = []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden)
            if self.gradient_checkpointing and self.training:
                hidden, weights = torch.utils.checkpoint.checkpoint(
                    layer, hidden, rope, mask, is_causal, None, output_attentions, use_reentrant=False
                )
            else:
                hidden, weights = layer(hidden, rope, mask, is_causal, cache, output_attentions)
            if output_attentions:
                all_attn.append(weights)
        hidden = self.norm(hidden)
        if output_hidden_states:
            all_hidden.append(hidden)
        return (
            hidden,
            tuple(all_hidden) if output_hidden_states else None,
            tuple(all_attn) if output_attentions else None,
        )

    def fused_decode(self, x: torch.Tensor, rope, mask, cache) -> torch.Tensor | None:
        """Every layer of one decoding step in one op (`kernels.decode_layers`), or None where that does not apply
        (autograd, a layer that is not the plain one, other devices): then the layers run one by one."""
        if (torch.is_grad_enabled() or x.shape[0] > kernels.MAX_ROWS
                or not kernels.decode_attention_applies(x, cache.keys[0])):
            return None
        key = ("layers", x.dtype)
        if key not in cache.decode_plans:  # gathered once per cache, as the layers' own plans
            cache.decode_plans[key] = decode_stack_weights(self.layers, x.dtype)
        plan = cache.decode_plans[key]
        if plan is None:
            return None
        slots = cache.decode_slots()
        if slots is None:
            return None
        key_caches, value_caches, positions, kv_len = slots
        cos, sin = rope
        ln1, ln2, eps, kind, qkv, o, gate_up, down, group, scale = plan
        return kernels.decode_layers(x, ln1, ln2, eps, kind, qkv, o, gate_up, down, group, cos, sin, key_caches,
                                     value_caches, positions, mask, kv_len, scale)
