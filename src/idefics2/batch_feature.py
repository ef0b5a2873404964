"""`BatchFeature`: the dict the processor, tokenizer and image processor return.

It behaves like transformers' `BatchFeature` where user code relies on it: `inputs["input_ids"]`,
`inputs.input_ids`, `.keys()`/`.items()`, `model.generate(**inputs)`, and `inputs.to(device)` /
`inputs.to(torch.bfloat16)` (a dtype only casts floating-point tensors, so token ids stay int64).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

TENSOR_TYPES = (None, "pt", "np")


def _as_tensor_type(value: Any, tensor_type: str | None, key: str) -> Any:
    if tensor_type is None:
        return value
    if tensor_type == "pt":
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, np.ndarray):
            return torch.from_numpy(value)  # zero-copy: pixel buffers can be hundreds of MB
        return torch.from_numpy(_stack_rectangular(value, key))
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value
    return _stack_rectangular(value, key)


def _stack_rectangular(value: Any, key: str) -> np.ndarray:
    """Nested lists -> one array, with a clear error for ragged rows (e.g. unpadded token ids)."""
    try:
        array = np.asarray(value)
    except ValueError as exc:  # numpy >= 1.24 refuses ragged nesting
        raise ValueError(
            f"cannot make a tensor from '{key}': its rows have different lengths; pass padding=True "
            "(or padding='max_length' with max_length) to get rectangular tensors"
        ) from exc
    if array.dtype == object:
        raise ValueError(f"cannot make a tensor from '{key}': its rows have different lengths; pass padding=True")
    if array.dtype.kind in "iub" and array.dtype != np.int64 and not key.startswith("pixel_values"):
        array = array.astype(np.int64)  # token ids and masks are int64 like transformers'
    return array


class BatchFeature(dict):
    """A `dict` of model inputs with attribute access, tensor conversion and `.to(...)`."""

    def __init__(self, data: dict[str, Any] | None = None, tensor_type: str | None = None) -> None:
        super().__init__(data or {})
        self.convert_to_tensors(tensor_type)

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"'BatchFeature' has no key or attribute '{name}'") from None

    def __getstate__(self) -> dict[str, Any]:
        return dict(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.update(state)

    def convert_to_tensors(self, tensor_type: str | None = None) -> BatchFeature:
        """Convert every value to torch tensors (`"pt"`) or numpy arrays (`"np"`) in place; None keeps them."""
        if tensor_type not in TENSOR_TYPES:
            raise ValueError(f"return_tensors must be one of 'pt', 'np' or None, got {tensor_type!r}")
        for key in list(self.keys()):
            self[key] = _as_tensor_type(self[key], tensor_type, key)
        return self

    def to(self, *args: Any, **kwargs: Any) -> BatchFeature:
        """Move tensors like `torch.Tensor.to`: `.to("cuda")`, `.to(torch.bfloat16)`, `.to(device, dtype)`,
        `.to(device=..., dtype=..., non_blocking=...)`. A dtype is applied to floating-point tensors only."""
        device = kwargs.pop("device", None)
        dtype = kwargs.pop("dtype", None)
        non_blocking = kwargs.pop("non_blocking", False)
        if kwargs:
            raise TypeError(f"BatchFeature.to() got unexpected keyword arguments {sorted(kwargs)}")
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif isinstance(arg, (str, torch.device, int)):
                device = arg
            else:
                raise TypeError(f"BatchFeature.to() expects a device or a torch.dtype, got {arg!r}")
        moved: dict[str, Any] = {}
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                target_dtype = dtype if dtype is not None and value.is_floating_point() else None
                value = value.to(device=device, dtype=target_dtype, non_blocking=non_blocking)
            moved[key] = value
        self.update(moved)
        return self
