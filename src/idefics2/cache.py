"""Preallocated key/value cache for the text decoder.

One buffer per layer, [batch, kv_heads, capacity, head_dim], written in place: decoding appends a slice,
no concatenation. `generate` sizes it to prompt + new tokens up front; a forward pass that needs more room
than allocated grows it (one copy, capacity doubled), so plain `forward(use_cache=True)` chains also work.
Every position is kept; the sliding window is applied by the attention mask.
"""

from __future__ import annotations

from collections.abc import Sequence

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
        device: torch.device | str | Sequence[torch.device | str],
    ) -> None:
        """`device`: one device, or one per layer (a decoder spread over several devices by a device_map)."""
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        devices = list(device) if isinstance(device, (list, tuple)) else [device] * num_layers
        if len(devices) != num_layers:
            raise ValueError(f"KVCache got {len(devices)} devices for {num_layers} layers")
        self.keys = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.values = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.lengths = [0] * num_layers
        self.growable = True
        self._positions: tuple[torch.Tensor, int] | None = None
        self.decode_plans: dict = {}  # per layer: its weights as the fused decode op takes them (see text.py)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def query_positions(self, q_len: int) -> torch.Tensor | None:
        """Per-row query positions; None: every row's new tokens follow the shared length."""
        return None

    def __len__(self) -> int:
        return len(self.keys)

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append key/value [B, Hkv, Q, D] for one layer; return all cached keys/values up to now."""
        start = self._reserve(layer_idx, key.shape[2])
        end = self.lengths[layer_idx]
        self.keys[layer_idx][:, :, start:end] = key
        self.values[layer_idx][:, :, start:end] = value
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def _reserve(self, layer_idx: int, n: int) -> int:
        """Room for `n` more tokens in one layer (grown if allowed); the layer's length moves on. Returns the
        first new position."""
        start = self.lengths[layer_idx]
        end = start + n
        if end > self.keys[layer_idx].shape[2]:
            if not self.growable:
                raise ValueError(f"{end} tokens do not fit this cache slot ({self.keys[layer_idx].shape[2]})")
            self._grow(layer_idx, end)
        self.lengths[layer_idx] = end
        return start

    def decode_slot(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Room for one new token per row in one layer, for a kernel that writes it itself (the fused decode
        attention): returns (keys, values, the write position of each row [B], keys seen after the write)."""
        start = self._reserve(layer_idx, 1)
        keys = self.keys[layer_idx]
        return keys, self.values[layer_idx], self._write_positions(start, keys.device), start + 1

    def decode_slots(self) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, int] | None:
        """`decode_slot` for every layer at once (keys and values as lists), or None where the layers are not at
        the same length (then nothing is reserved)."""
        start = self.lengths[0]
        if any(n != start for n in self.lengths):
            return None
        for i in range(len(self.keys)):
            self._reserve(i, 1)
        return self.keys, self.values, self._write_positions(start, self.keys[0].device), start + 1

    def _write_positions(self, start: int, device: torch.device) -> torch.Tensor:
        """[B] filled with `start`: one small tensor per step, shared by the layers."""
        if self._positions is None or self._positions[1] != start or self._positions[0].device != device:
            self._positions = (torch.full((self.keys[0].shape[0],), start, dtype=torch.long, device=device), start)
        return self._positions[0]

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
        self.keys = [k.index_select(0, indices.to(k.device)) for k in self.keys]
        self.values = [v.index_select(0, indices.to(v.device)) for v in self.values]

    def crop(self, length: int) -> None:
        """Forget everything after `length` tokens."""
        self.lengths = [min(n, length) for n in self.lengths]


class SlotKVCache:
    """KV cache for continuous batching: `max_batch` slots, each with its own length.

    Active requests occupy slots 0..active-1, so a decode step works on views (no gather). A request is
    prefilled straight into its slot through `slot_view` (batch 1); `release` moves the last active slot into
    the freed one, keeping the active rows contiguous. Keys past a row's length are garbage: the caller's
    attention mask hides them.
    """

    def __init__(self, num_layers: int, max_batch: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (max_batch, num_kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.active = 0
        self.decode_plans: dict = {}  # per layer: its weights as the fused decode op takes them (see text.py)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def max_batch(self) -> int:
        return self.keys[0].shape[0]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.lengths[: self.active].max()) if self.active else 0

    def query_positions(self, q_len: int) -> torch.Tensor:
        return self.lengths[: self.active, None] + torch.arange(q_len, device=self.lengths.device)

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode step: key/value [active, Hkv, 1, D] written at each row's own length."""
        n = self.active
        if key.shape[0] != n or key.shape[2] != 1:
            raise ValueError(f"slot cache update expects [{n}, heads, 1, dim], got {tuple(key.shape)}")
        keys, values, positions, end = self.decode_slot(layer_idx)
        rows = torch.arange(n, device=key.device)
        keys[rows, :, positions] = key[:, :, 0]
        values[rows, :, positions] = value[:, :, 0]
        return keys[:, :, :end], values[:, :, :end]

    def decode_slot(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """As KVCache.decode_slot: each active row writes at its own length (the lengths move on after the last
        layer)."""
        n = self.active
        positions = self.lengths[:n]
        end = int(positions.max()) + 1
        if end > self.capacity:
            raise ValueError(f"slot cache is full ({self.capacity} tokens per request)")
        if layer_idx == len(self.keys) - 1:
            positions = positions.clone()  # the write happens after the lengths move on
            self.lengths[:n] += 1
        return self.keys[layer_idx][:n], self.values[layer_idx][:n], positions, end

    def decode_slots(self) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, int]:
        """`decode_slot` for every layer at once (keys and values as lists)."""
        n = self.active
        positions = self.lengths[:n].clone()  # the writes happen after the lengths move on
        end = int(positions.max()) + 1
        if end > self.capacity:
            raise ValueError(f"slot cache is full ({self.capacity} tokens per request)")
        self.lengths[:n] += 1
        return [k[:n] for k in self.keys], [v[:n] for v in self.values], positions, end

    def slot_view(self, slot: int) -> KVCache:
        """A batch-1 KVCache writing into `slot` (for prefilling a new request there)."""
        view = KVCache.__new__(KVCache)
        view.keys = [k[slot:slot + 1] for k in self.keys]
        view.values = [v[slot:slot + 1] for v in self.values]
        view.lengths = [0] * len(self.keys)
        view.growable = False  # growing would reallocate away from the slot
        view._positions = None
        view.decode_plans = self.decode_plans
        return view

    def admit(self, prefilled: KVCache) -> int:
        """Make the slot just prefilled through `slot_view(self.active)` active; returns its index."""
        slot = self.active
        self.lengths[slot] = prefilled.get_seq_length()
        self.active += 1
        return slot

    def release(self, slot: int) -> int | None:
        """Free `slot`; the last active row moves into it. Returns the old index of the moved row (or None)."""
        last = self.active - 1
        moved = None
        if slot != last:
            length = int(self.lengths[last])
            for k, v in zip(self.keys, self.values):
                k[slot, :, :length] = k[last, :, :length]
                v[slot, :, :length] = v[last, :, :length]
            self.lengths[slot] = length
            moved = last
        self.lengths[last] = 0
        self.active -= 1
        return moved
