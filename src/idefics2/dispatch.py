"""Running one model spread over several devices: the `device_map` dicts of `from_pretrained`.

`checkpoint.load_pretrained` puts each parameter where its map entry says (a GPU, "cpu" = in RAM, "disk" = left
mapped from the safetensors files); `dispatch_model` then makes the forward pass work across them:

* every module above the blocks that must not be split (`NO_SPLIT`: a decoder layer, a vision encoder layer,
  a perceiver layer, an MLP, the vision embeddings) gets a forward pre-hook that moves its tensor arguments to
  the device it runs on, so each boundary copies activations once;
* "cpu" and "disk" entries run on the main device (the first GPU the map names, else the CPU). Next to a GPU
  their weights are copied to it for the call and the copies dropped after (cpu / disk offload); on a CPU-only
  map they are used where they are, so "disk" weights are only ever read through the file mapping;
* the root module returns its outputs on the main device, and `model.device` is the main device, so callers
  (generate, the engine) put inputs there;
* each decoder layer's KV cache lives on that layer's device (`MistralModel.layer_devices`).

The hooks are ours (a few lines, with nothing to configure) rather than accelerate's: accelerate's disk offload
replaces parameters by meta tensors and reads them back through its own offload index, while here the weights
already are zero-copy views of the files, and the KV cache needs per-layer devices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .connector import Idefics2PerceiverLayer
from .layers import GatedMLP
from .text import MistralDecoderLayer, MistralModel
from .vision import Idefics2EncoderLayer, Idefics2VisionEmbeddings

# Blocks whose forward mixes the outputs of their submodules: all of a block runs on one device.
NO_SPLIT: tuple[type[nn.Module], ...] = (
    Idefics2VisionEmbeddings, Idefics2EncoderLayer, GatedMLP, Idefics2PerceiverLayer, MistralDecoderLayer,
)
OFFLOAD = ("cpu", "disk")


def covering_key(name: str, keys: Iterable[str]) -> str | None:
    """The most specific device_map key that covers module or tensor `name` ("" covers everything)."""
    best = None
    for key in keys:
        if (key == "" or name == key or name.startswith(key + ".")) and (best is None or len(key) > len(best)):
            best = key
    return best


def concrete_device(device: torch.device | str) -> torch.device:
    """`cuda` -> `cuda:<current>`, so devices compare equal to those tensors report."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def main_device(placements: dict[str, str]) -> torch.device:
    """Where inputs go and results come back: the first compute device the map names, else the CPU."""
    for value in placements.values():
        if value not in OFFLOAD:
            return torch.device(value)
    return torch.device("cpu")


def split_block(model: nn.Module, key: str) -> str | None:
    """The name of the NO_SPLIT block strictly containing module `key`, or None."""
    parts = key.split(".") if key else []
    for depth in range(len(parts)):
        name = ".".join(parts[:depth])
        module = model.get_submodule(name)
        if isinstance(module, NO_SPLIT):
            return name
    return None


def move(value: Any, device: torch.device) -> Any:
    """Tensors in `value` (nested tuples, lists, dicts, dataclasses such as the model outputs) on `device`;
    anything else, e.g. a KV cache, as is."""
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device)
    if isinstance(value, tuple):
        moved = [move(v, device) for v in value]
        return type(value)(*moved) if hasattr(value, "_fields") else type(value)(moved)
    if isinstance(value, list):
        return [move(v, device) for v in value]
    if isinstance(value, dict):
        return type(value)((k, move(v, device)) for k, v in value.items())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            setattr(value, field.name, move(getattr(value, field.name), device))
    return value


class AlignDevice:
    """Forward hooks of one module: inputs to `device`; `offloaded` parameters (owner module, name) copied
    there for the call and the originals put back after; outputs to `outputs_to` when set (the root)."""

    def __init__(self, device: torch.device, offloaded: list[tuple[nn.Module, str]],
                 outputs_to: torch.device | None = None) -> None:
        self.device = device
        self.offloaded = offloaded
        self.outputs_to = outputs_to
        self.saved: list[tuple[nn.Module, str, torch.Tensor]] = []

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self.restore()  # a forward that raised left its copies in place
        for owner, name in self.offloaded:
            original = owner._parameters[name]
            self.saved.append((owner, name, original))
            owner._parameters[name] = original.to(self.device)
        return move(args, self.device), move(kwargs, self.device)

    def after(self, module: nn.Module, args: tuple, output: Any) -> Any:
        self.restore()
        return move(output, self.outputs_to) if self.outputs_to is not None else None

    def restore(self) -> None:
        for owner, name, original in self.saved:
            owner._parameters[name] = original
        self.saved.clear()


def _inside_blocks(modules: dict[str, nn.Module]) -> set[str]:
    """Names of the modules strictly inside a NO_SPLIT block (they go wherever their block goes)."""
    return {
        name for block_name, block in modules.items() if isinstance(block, NO_SPLIT)
        for name, _ in block.named_modules(prefix=block_name) if name != block_name
    }


def param_bytes(param: torch.Tensor, element: int) -> int:
    """Bytes of `param` once loaded: `element` bytes per value for floating point (the load dtype), else its own."""
    return param.numel() * (element if param.is_floating_point() else param.element_size())


def _is_unit(module: nn.Module) -> bool:
    """A piece a device_map places as a whole: a NO_SPLIT block, or a module's own parameters."""
    return isinstance(module, NO_SPLIT) or next(iter(module.parameters(recurse=False)), None) is not None


def _has_forward(module: nn.Module) -> bool:
    return type(module).forward is not nn.Module.forward  # ModuleList / ModuleDict have none


def dispatch_model(model: nn.Module, placements: dict[str, str], main: torch.device | str | None = None) -> None:
    """Attach the hooks that run `model` over the devices of `placements` (module name -> "cuda:N", "cpu",
    "disk"), whose parameters are already where the map says. Records `model.hf_device_map`."""
    remove_dispatch(model)
    main = concrete_device(main if main is not None else main_device(placements))
    run_on = {key: main if value in OFFLOAD else concrete_device(value) for key, value in placements.items()}
    modules = dict(model.named_modules())
    in_block = _inside_blocks(modules)

    def covered(name: str) -> torch.device | None:
        key = covering_key(name, placements)
        return None if key is None else run_on[key]

    def units_below(name: str) -> list[str]:
        prefix = name + "." if name else ""
        return [n for n, m in modules.items() if n.startswith(prefix) and n not in in_block and _is_unit(m)]

    def device_of(name: str) -> torch.device:
        if name == "":
            return main
        device = covered(name)
        if device is None:  # a container the map does not name: where its first block runs
            device = next((d for d in map(covered, units_below(name)) if d is not None), main)
        return device

    handles = []
    for name, module in modules.items():
        device = device_of(name if name not in in_block else _block_of(name, modules))
        for buffer_name, buffer in module.named_buffers(recurse=False):  # small, derived: kept where used
            if buffer is not None and buffer.device != device:
                module._buffers[buffer_name] = buffer.to(device)
        if name in in_block or not _has_forward(module):
            continue
        owners = module.modules() if isinstance(module, NO_SPLIT) else [module]
        offloaded = [(owner, p) for owner in owners for p, t in owner._parameters.items()
                     if t is not None and t.device != device]
        hook = AlignDevice(device, offloaded, outputs_to=main if name == "" else None)
        handles.append(module.register_forward_pre_hook(hook.before, with_kwargs=True))
        if offloaded or name == "":
            handles.append(module.register_forward_hook(hook.after))
        if isinstance(module, MistralModel):
            module.layer_devices = [device_of(f"{name}.layers.{i}" if name else f"layers.{i}")
                                    for i in range(len(module.layers))]
    model._dispatch_handles = handles
    model._main_device = main
    model.hf_device_map = dict(placements)


def _block_of(name: str, modules: dict[str, nn.Module]) -> str:
    parts = name.split(".")
    for depth in range(len(parts)):
        candidate = ".".join(parts[:depth])
        if isinstance(modules.get(candidate), NO_SPLIT):
            return candidate
    return name


def remove_dispatch(model: nn.Module) -> None:
    """Detach the hooks of `dispatch_model` (the parameters stay where they are)."""
    for handle in model.__dict__.pop("_dispatch_handles", []):
        handle.remove()
    model.__dict__.pop("_main_device", None)
    for module in model.modules():
        if isinstance(module, MistralModel):
            module.__dict__.pop("layer_devices", None)


# ---- device_map="auto" / "balanced" / "sequential": a dict planned from the room on each device --------------


def placement_units(model: nn.Module, dtype: torch.dtype) -> list[tuple[str, int]]:
    """The smallest pieces a device_map may place, in forward order, with their bytes in `dtype`: each block
    that must not be split, and each other module's own parameters (e.g. the perceiver's latents)."""
    element = torch.empty(0, dtype=dtype).element_size()
    modules = dict(model.named_modules())
    in_block = _inside_blocks(modules)
    units = []
    for name, module in modules.items():
        if name in in_block or not _is_unit(module):
            continue
        params = module.parameters(recurse=isinstance(module, NO_SPLIT))
        units.append((name, sum(param_bytes(p, element) for p in params)))
    return units


def plan_device_map(
    model: nn.Module, dtype: torch.dtype, budgets: list[tuple[str, int | None]], balanced: bool = True
) -> dict[str, str]:
    """Place `model`'s units in forward order on the devices of `budgets` ([(device, bytes or None =
    unlimited)], GPUs first, then "cpu", then "disk"): each device takes units until the next one does not fit,
    then the next device. `balanced`: the GPUs share the weights evenly instead of filling the first one.
    Returns the smallest dict that says it (a module whose units all share a device gets one key)."""
    units = placement_units(model, dtype)
    total = sum(size for _, size in units)
    caps = [cap for _, cap in budgets]
    gpus = [i for i, (device, _) in enumerate(budgets) if device not in OFFLOAD]
    if balanced and len(gpus) > 1:
        gpu_room = sum(cap if cap is not None else total for cap in (caps[i] for i in gpus))
        share = min(total, gpu_room) / len(gpus) + max(size for _, size in units)
        for i in gpus[:-1]:  # the last GPU takes what is left, up to its own room
            caps[i] = share if caps[i] is None else min(caps[i], share)
    assignment: dict[str, str] = {}
    index, used = 0, 0
    for name, size in units:
        while index < len(budgets) and caps[index] is not None and used + size > caps[index]:
            index, used = index + 1, 0
        if index == len(budgets):
            room = ", ".join(f"{device}: {cap / 2**30:.2f} GiB" for device, cap in budgets if cap is not None)
            raise MemoryError(f"the weights ({total / 2**30:.2f} GiB) do not fit the room given ({room}); "
                              f"{name} ({size / 2**30:.2f} GiB) finds no place: raise max_memory, allow "
                              f"'disk' with offload_folder=, or quantize")
        assignment[name] = budgets[index][0]
        used += size
    return _compact(model, assignment)


def _compact(model: nn.Module, assignment: dict[str, str]) -> dict[str, str]:
    """One key for each largest module whose units all share a device; "" when the whole model does."""
    below: dict[str, set[str]] = {}
    for unit, device in assignment.items():
        parts = unit.split(".") if unit else []
        for depth in range(len(parts) + 1):
            below.setdefault(".".join(parts[:depth]), set()).add(device)
    device_map: dict[str, str] = {}
    covered: list[str] = []
    for name, _ in model.named_modules():
        if name not in below or any(name == c or name.startswith(c + ".") for c in covered if c):
            continue
        devices = below[name]
        if len(devices) == 1:
            device_map[name] = next(iter(devices))
            covered.append(name)
            if name == "":
                break
        elif name in assignment:  # the module's own parameters, its children placed apart
            device_map[name] = assignment[name]
    return device_map
