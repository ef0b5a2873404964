"""Preallocated key/value cache for the text decoder.

One buffer per layer, [batch, kv_heads, capacity, head_dim], written in place: decoding appends a slice,
no concatenation. `generate` sizes it to prompt + new tokens up front; a forward pass that needs more room
than allocated grows it (one copy, capacity doubled), so plain `forward(use_cache=True)` chains also work.
Every position is kept; the sliding window is applied by the attention mask.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = [0] * num_layers

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def __len__(self) -> int:
        return len(self.keys)

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append key/value [B, Hkv, Q, D] for one layer; return all cached keys/values up to now."""
        start = self.lengths[layer_idx]
        end = start + key.shape[2]
        if end > self.keys[layer_idx].shape[2]:
            self._grow(layer_idx, end)
        self.keys[layer_idx][:, :, start:end] = key
        self.values[layer_idx][:, :, start:end] = value
        self.lengths[layer_idx] = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def _grow(self, layer_idx: int, needed: int) -> None:
        old_k, old_v = self.keys[layer_idx], self.values[layer_idx]
        new_capacity = max(needed, 2 * old_k.shape[2])
        shape = (*old_k.shape[:2], new_capacity, old_k.shape[3])
        self.keys[layer_idx] = old_k.new_zeros(shape)
        self.values[layer_idx] = old_v.new_zeros(shape)
        length = self.lengths[layer_idx]
        self.keys[layer_idx][:, :, :length] = old_k[:, :, :length]
        self.values[layer_idx][:, :, :length] = old_v[:, :, :length]

    def reorder(self, indices: torch.Tensor) -> None:
        """Select/reorder batch rows (beam search)."""
        self.keys = [k.index_select(0, indices) for k in self.keys]
        self.values = [v.index_select(0, indices) for v in self.values]

    def crop(self, length: int) -> None:
        """Forget everything after `length` tokens."""
        self.lengths = [min(n, length) for n in self.lengths]
