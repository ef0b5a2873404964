"""Checkpoint I/O: safetensors (single file or sharded), key-name compatibility, hub resolution.

Loading builds the model on the meta device (no random init, no second copy) and assigns tensors that are
zero-copy views of a copy-on-write mmap of each file, so only the pages actually used are read and RSS stays
at about one checkpoint's size even when converting dtypes tensor by tensor. Only safetensors are read:
no pickle is ever loaded.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
from collections.abc import Iterator
from typing import Any

import torch
from safetensors.torch import save_file

from . import kernels
from .config import CONFIG_NAME, Idefics2Config

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "float64": torch.float64,
}


class CheckpointError(OSError):
    """A checkpoint file is missing, truncated, corrupt, or does not fit the model."""


# ---- locating a checkpoint -----------------------------------------------------------------------------------
def resolve_checkpoint_dir(
    path_or_id: str | os.PathLike, allow_patterns: list[str] | None = None, **hub_kwargs: Any
) -> str:
    """A local directory as is; otherwise a hub id fetched (or found in the cache) through huggingface_hub."""
    path = os.fspath(path_or_id)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory that contains {CONFIG_NAME}")
    looks_like_hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", path) is not None and not path.startswith((".", "/"))
    if not looks_like_hub_id:
        raise CheckpointError(f"Checkpoint directory {path!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            path, allow_patterns=allow_patterns or ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"],
            **hub_kwargs,
        )
    except Exception as e:  # offline, unknown repo, gated, ...
        raise CheckpointError(
            f"Could not get model {path!r} from the Hugging Face Hub ({type(e).__name__}: {e}). "
            f"If the hub is not reachable, download it elsewhere (e.g. `hf download {path} --local-dir DIR`) "
            f"and pass that local directory instead: from_pretrained('DIR')."
        ) from e


def weight_files(directory: str) -> list[str]:
    """The safetensors files of a checkpoint directory (index order for sharded checkpoints)."""
    index_path = os.path.join(directory, WEIGHTS_INDEX_NAME)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path} is not a valid safetensors index: {e}") from e
        files = list(dict.fromkeys(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
        if missing:
            raise CheckpointError(f"{index_path} lists shards that are missing from {directory}: {missing}")
        return [os.path.join(directory, f) for f in files]
    single = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(single):
        return [single]
    others = sorted(f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
    hint = f" It has {others}: pickle files are never loaded; convert them to safetensors." if others else ""
    raise CheckpointError(f"No {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {directory}.{hint}")


# ---- reading safetensors -------------------------------------------------------------------------------------
def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Tensors of one safetensors file as zero-copy views of a private (copy-on-write) mmap.

    Every header entry is validated against the file size, so a truncated or corrupt file is reported by
    path instead of failing later inside torch.
    """
    size = os.path.getsize(path)
    if size < 8:
        raise CheckpointError(f"{path} is truncated or not a safetensors file ({size} bytes)")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len <= 0 or 8 + header_len > size:
            raise CheckpointError(f"{path} is truncated or corrupt: header length {header_len}, file size {size}")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is corrupt: its safetensors header is not valid JSON ({e})") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{path} is corrupt: its safetensors header is not a JSON object")
        data_start = 8 + header_len
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > data_start else b""
    tensors: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path} is corrupt: bad header entry for {name!r}: {info!r}") from e
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty(0, dtype=dtype).element_size()
        if end - begin != nbytes or begin < 0 or data_start + end > size:
            raise CheckpointError(
                f"{path} is truncated or corrupt: tensor {name!r} needs bytes [{begin}, {end}) of the data "
                f"section ({nbytes} for shape {shape} {info['dtype']}) but the file has {size - data_start}"
            )
        if numel == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        offset = data_start + begin
        tensor = torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes, offset=offset)
        if offset % tensor.new_empty(0, dtype=dtype).element_size():
            tensor = tensor.clone()  # misaligned data: one copy, then reinterpret
        tensors[name] = tensor.view(dtype).reshape(shape)
    return tensors


def iter_checkpoint_tensors(directory: str) -> Iterator[tuple[str, torch.Tensor, str]]:
    for path in weight_files(directory):
        for name, tensor in read_safetensors(path).items():
            yield name, tensor, path


# ---- key names across versions -------------------------------------------------------------------------------
# Prefix renames, applied in order, to the names used by this package (== transformers 4.40 .. 5.24).
_KEY_RENAMES = [
    # Original M4 remote-code checkpoints (before conversion to the transformers format).
    (r"^model\.layers\.", "model.text_model.layers."),
    (r"^model\.norm\.", "model.text_model.norm."),
    (r"^model\.perceiver_resampler\.", "model.connector.perceiver_resampler."),
    (r"^model\.modality_projection\.", "model.connector.modality_projection."),
    (r"^model\.embed_tokens\.", "model.text_model.embed_tokens."),
    (r"^lm_head\.linear\.", "lm_head."),
    # Newer transformers layouts name the text decoder `language_model`.
    (r"^model\.language_model\.", "model.text_model."),
]
# Extra rows for added tokens that the M4 checkpoints stored apart (concatenated after the base rows).
_SPLIT_EMBEDDINGS = {
    "model.text_model.embed_tokens.additional_embedding.weight": "model.text_model.embed_tokens.weight",
    "additional_fc.weight": "lm_head.weight",
    "lm_head.additional_fc.weight": "lm_head.weight",
}


def normalize_key(name: str) -> str | None:
    """Map a checkpoint key to this package's name for the full model (`model.` prefix); None = ignore."""
    if name.endswith((".inv_freq", ".original_inv_freq")):
        return None  # recomputed buffers written by old versions
    if not (name.startswith("model.") or name.startswith("lm_head.") or name.startswith("additional_fc.")):
        name = "model." + name  # an Idefics2Model state dict (no base prefix)
    for pattern, repl in _KEY_RENAMES:
        name = re.sub(pattern, repl, name)
    return name


def collect_state_dict(directory: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a checkpoint under this package's full-model key names, and the file of each."""
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    extra_rows: dict[str, torch.Tensor] = {}
    for raw_name, tensor, path in iter_checkpoint_tensors(directory):
        name = normalize_key(raw_name)
        if name is None:
            continue
        if name in _SPLIT_EMBEDDINGS:
            extra_rows[_SPLIT_EMBEDDINGS[name]] = tensor
            continue
        if name in state:
            raise CheckpointError(f"{path}: tensor {raw_name!r} maps to {name!r}, which {origin[name]} also has")
        state[name] = tensor
        origin[name] = path
    for name, rows in extra_rows.items():
        if name in state:
            state[name] = torch.cat([state[name], rows.to(state[name].dtype)])
    return state, origin


# ---- load ----------------------------------------------------------------------------------------------------
def parse_dtype(dtype: Any, config: Idefics2Config, state: dict[str, torch.Tensor]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        stored = config.extra.get("dtype")
        if isinstance(stored, str) and stored in _DTYPE_NAMES:
            return _DTYPE_NAMES[stored]
        floating = [t.dtype for t in state.values() if t.is_floating_point()]
        return floating[0] if floating else torch.float32
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype={dtype!r} is not supported; use 'auto', 'float32', 'bfloat16' or 'float16'")


def available_memory() -> int | None:
    """Bytes of memory the kernel says are available (Linux), or None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def placement_advice(config: Idefics2Config, dtype: torch.dtype) -> str:
    """The memory the weights need, and what to try instead."""
    from .memory import weight_bytes

    gib = 2**30
    return (f"the weights need {weight_bytes(config, dtype) / gib:.1f} GiB in {str(dtype).removeprefix('torch.')}; "
            f"try quantize='int8' ({weight_bytes(config, dtype, 'int8') / gib:.1f} GiB) or 'int4' "
            f"({weight_bytes(config, dtype, 'int4') / gib:.1f} GiB), or keep the checkpoint's dtype on the CPU "
            "(device_map='cpu' or 'disk': the weights stay mapped from the files and are read as they are used), "
            "or put some modules on 'cpu' or 'disk' in a device_map dict")


_DEVICE_CHOICES = "use 'cpu', 'disk', 'cuda', 'cuda:N', 'mps' or a GPU index"
PLANNED_MAPS = ("auto", "balanced", "sequential")  # device_map strings planned from the room on each device


def _map_value(key: Any, value: Any) -> str:
    """One device_map dict value as 'cpu', 'disk', 'mps', 'cuda' or 'cuda:N'."""
    if not isinstance(key, str):
        raise ValueError(f"device_map keys are module names (str); got {key!r}")
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return f"cuda:{value}"
    if isinstance(value, torch.device):
        value = str(value)
    if isinstance(value, str):
        if value == "disk":
            return value
        try:
            device = torch.device(value)
        except (RuntimeError, TypeError):
            device = None
        if device is not None and device.type in ("cpu", "cuda", "mps"):
            return "cpu" if device.type == "cpu" else str(device)
    raise ValueError(f"device_map[{key!r}] = {value!r} is not a device; {_DEVICE_CHOICES}")


def normalize_device_map(device_map: dict) -> dict[str, str]:
    """A device_map dict with every value checked and spelled 'cpu', 'disk', 'mps', 'cuda' or 'cuda:N'."""
    if not device_map:
        raise ValueError("device_map is an empty dict; map module names to devices, e.g. {'': 'cpu'}")
    return {key: _map_value(key, value) for key, value in device_map.items()}


def spreads_devices(device_map: Any) -> bool:
    """Whether `device_map` is a dict naming more than one place ('cpu' and 'disk' count as two)."""
    return isinstance(device_map, dict) and len(set(normalize_device_map(device_map).values())) > 1


def parse_device(device: Any, device_map: Any) -> torch.device:
    """The compute device of `device` or `device_map`; for a dict spreading the model over several places, the
    main device: the first GPU it names (inputs go there, results come back there), else the CPU.
    ("disk" means: the CPU, with the weights left mapped from the files.)"""
    if device is not None and device_map is not None:
        raise ValueError("Pass either device or device_map, not both")
    if isinstance(device, dict):
        raise ValueError("a dict of module names to devices goes in device_map=, not device=")
    target = device if device is not None else device_map
    if target is None:
        return torch.device("cpu")
    if isinstance(target, dict):
        from .dispatch import main_device

        return main_device(normalize_device_map(target))
    if target in PLANNED_MAPS:  # the first GPU, else the CPU (load_pretrained may plan a dict instead)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if target == "disk":
        return torch.device("cpu")
    if isinstance(target, int):
        return torch.device("cuda", target)
    try:
        return torch.device(target)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={target!r} is not a valid device") from e


def _device_problem(where: str, value: str) -> str | None:
    """Why `value` ('cuda:1', 'mps', ...) cannot be used here, or None."""
    device = torch.device(value) if value != "disk" else torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"{where} asks for CUDA but no CUDA device is available"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"{where} asks for {value} but only {torch.cuda.device_count()} CUDA device(s) are visible"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return f"{where} asks for MPS but it is not available"
    return None


def free_memory(device: torch.device) -> int | None:
    """Bytes free for new weights on `device` (a GPU's free memory, the CPU's available memory), or None."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        return available_memory()
    return None


def check_placement(device: torch.device, device_map: Any, model, config: Idefics2Config, dtype: torch.dtype,
                    converts: bool, offload_folder: str | os.PathLike | None = None,
                    quantized: bool = False) -> None:
    """Fail before reading any weight when the placement cannot work, with the estimate and what to try.

    `converts`: the weights change dtype (so on the CPU they need memory of their own, not just the mapping);
    `quantized`: they are quantized after loading (the GPU estimate would not apply).
    """
    gib = 2**30
    placements = normalize_device_map(device_map) if isinstance(device_map, dict) else None
    if placements is not None:
        names = {name for name, _ in model.named_modules()}
        unknown = [key for key in placements if key and key not in names]
        if unknown:
            raise ValueError(f"device_map names modules the model does not have: {unknown}")
        uncovered = [n for n, _ in model.named_parameters()
                     if not any(k == "" or n == k or n.startswith(k + ".") for k in placements)]
        if uncovered:
            raise ValueError(f"device_map leaves parameters without a device: {_describe(uncovered)}")
        for key, value in placements.items():
            problem = _device_problem(f"device_map[{key!r}] = {value!r}", value)
            if problem:
                raise ValueError(f"{problem}; " + placement_advice(config, dtype))
    else:
        problem = _device_problem(f"device {str(device)!r}", str(device))
        if problem:
            raise ValueError(f"{problem}; " + placement_advice(config, dtype))
    if placements is not None and len(set(placements.values())) > 1:
        _check_spread(placements, model, config, dtype, converts, offload_folder)
        return
    if device.type == "cpu" and converts:
        from .memory import weight_bytes

        needed, available = weight_bytes(config, dtype), available_memory()
        if available is not None and needed > available:
            raise MemoryError(f"converting the weights to {str(dtype).removeprefix('torch.')} needs "
                              f"{needed / gib:.1f} GiB but {available / gib:.1f} GiB are available; "
                              + placement_advice(config, dtype))
    if device.type == "cuda" and not quantized:
        from .memory import weight_bytes

        needed, free = weight_bytes(config, dtype), free_memory(device)
        if free is not None and needed > free:
            raise MemoryError(f"{str(device)!r} has {free / gib:.1f} GiB free; " + placement_advice(config, dtype))


def _check_spread(placements: dict[str, str], model, config: Idefics2Config, dtype: torch.dtype, converts: bool,
                  offload_folder: str | os.PathLike | None) -> None:
    """A device_map dict over several places: no block split, room on every device, a folder for converted
    'disk' weights."""
    from .dispatch import covering_key, param_bytes, split_block

    gib = 2**30
    for key in placements:
        block = split_block(model, key)
        if block is not None:
            raise ValueError(f"device_map[{key!r}] splits {block!r} ({type(model.get_submodule(block)).__name__}), "
                             f"which runs on one device; place {block!r} as a whole")
    element = torch.empty(0, dtype=dtype).element_size()
    needed: dict[str, int] = {}
    for name, param in model.named_parameters():
        where = placements[covering_key(name, placements)]
        needed[where] = needed.get(where, 0) + param_bytes(param, element)
    disk_keys = [key for key, value in placements.items() if value == "disk"]
    if disk_keys and converts:
        if offload_folder is None:
            raise ValueError(f"device_map[{disk_keys[0]!r}] = 'disk' needs offload_folder=DIR: converting to "
                             f"{str(dtype).removeprefix('torch.')} makes new tensors, written there and mapped "
                             "(or keep the checkpoint's dtype with dtype='auto')")
        existing = os.path.abspath(offload_folder)
        while not os.path.isdir(existing):
            existing = os.path.dirname(existing)
        free = shutil.disk_usage(existing).free
        if needed.get("disk", 0) > free:
            raise MemoryError(f"device_map puts {needed['disk'] / gib:.1f} GiB on 'disk' but {offload_folder} "
                              f"has {free / gib:.1f} GiB free")
    for where, nbytes in needed.items():
        if where == "disk":
            continue
        free = free_memory(torch.device(where))
        if free is not None and nbytes > free:
            keys = [repr(key) for key, value in placements.items() if value == where]
            raise MemoryError(f"device_map puts {nbytes / gib:.2f} GiB of weights on {where!r} ({_describe(keys, 3)}) "
                              f"but {free / gib:.2f} GiB are free there; " + placement_advice(config, dtype))


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_max_memory(max_memory: dict) -> dict[str, int]:
    """{0: "20GiB", "cuda:1": 2**34, "cpu": "60GB"} -> {"cuda:0": bytes, "cuda:1": bytes, "cpu": bytes}."""
    if not isinstance(max_memory, dict) or not max_memory:
        raise ValueError(f"max_memory must be a dict of devices to sizes, e.g. {{0: '20GiB', 'cpu': '60GiB'}}; "
                         f"got {max_memory!r}")
    parsed = {}
    for key, value in max_memory.items():
        device = _map_value("max_memory", key) if not isinstance(key, str) else key
        if device not in ("cpu", "disk") and not re.fullmatch(r"cuda:\d+", device):
            raise ValueError(f"max_memory key {key!r} is not a device: use a GPU index, 'cuda:N' or 'cpu'")
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            size = value
        else:
            match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", str(value), re.IGNORECASE)
            if match is None:
                raise ValueError(f"max_memory[{key!r}] = {value!r} is not a size: use bytes or e.g. '20GiB', '500MB'")
            size = int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])
        parsed[device] = size
    return parsed


def plan_string_map(cls, config: Idefics2Config, dtype: torch.dtype, mode: str, max_memory: dict | None,
                    quantizing: bool, disk_allowed: bool) -> str | dict[str, str]:
    """device_map "auto" / "balanced" / "sequential": one device where that is the whole answer, else a dict
    planned by `dispatch.plan_device_map` from the room on each device (90% of what is free, or max_memory)."""
    from .dispatch import plan_device_map
    from .modeling import empty_weights

    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    if max_memory is None and len(gpus) <= 1:
        return gpus[0] if gpus else "cpu"  # the one-device path, with its own fit check
    if quantizing:
        if max_memory is not None:
            raise ValueError("max_memory= plans a device_map over several devices, which cannot be combined with "
                             "quantization yet; quantize on one device (device_map='cpu' or 'cuda')")
        return gpus[0]  # several GPUs: quantized models stay on one
    limits = parse_max_memory(max_memory) if max_memory is not None else {}
    unknown = [d for d in limits if d.startswith("cuda:") and d not in gpus]
    if unknown:
        raise ValueError(f"max_memory names {unknown[0]} but {len(gpus)} CUDA device(s) are visible")
    budgets: list[tuple[str, int | None]] = []
    for gpu in gpus:
        budgets.append((gpu, limits.get(gpu, int(0.9 * torch.cuda.mem_get_info(torch.device(gpu))[0]))))
    available = available_memory()
    budgets.append(("cpu", limits.get("cpu", int(0.9 * available) if available is not None else None)))
    if disk_allowed:
        budgets.append(("disk", None))
    with empty_weights():
        skeleton = cls(config)
    plan = plan_device_map(skeleton, dtype, budgets, balanced=mode != "sequential")
    return plan[""] if set(plan) == {""} else plan


def _describe(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_pretrained(
    cls,
    pretrained_model_name_or_path: str | os.PathLike,
    *,
    config: Idefics2Config | None = None,
    dtype: Any = None,
    torch_dtype: Any = None,
    device: Any = None,
    device_map: Any = None,
    attn_implementation: str | None = None,
    quantization_config: Any = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    low_cpu_mem_usage: bool | None = None,
    use_safetensors: bool | None = None,
    trust_remote_code: bool | None = None,
    quantize: str | None = None,
    quantize_group_size: int = 64,
    quantize_lm_head: bool | str = True,
    offload_folder: str | os.PathLike | None = None,
    max_memory: dict | None = None,
):
    """Build `cls` from a checkpoint directory or hub id without random init and without a second copy.

    `dtype` (alias `torch_dtype`): "auto"/None keeps the checkpoint's dtype; or a torch dtype / its name.
    `device` or `device_map`: "cpu", "cuda", "cuda:1", "auto", "disk", or a dict of module names to devices
    ("cuda:N" or N, "cpu" = in RAM, "disk" = left mapped from the files) that may spread the model over several
    (see `idefics2.dispatch`); `offload_folder` receives "disk" weights that had to be converted.
    "auto" / "balanced" spread the model evenly over the visible GPUs when there are several (then the CPU, then
    "disk"), "sequential" fills them in order; `max_memory` ({0: "20GiB", "cpu": "60GiB"}) caps each device and
    plans a dict also for one GPU or the CPU alone. Without it "auto" is the one GPU, or the CPU.
    `attn_implementation`: "sdpa" (default), "eager" or "flash_attention_2".
    `quantize`: "int8" or "int4" quantizes the text decoder's projections at load, and `lm_head` the same way
    (`quantize_lm_head`: "int8" / "int4" to choose, False to keep it in float; see `idefics2.quantize`); a
    checkpoint written quantized by
    `idefics2 quantize` is recognised from its config.
    `low_cpu_mem_usage`, `use_safetensors` and `trust_remote_code` are accepted for drop-in compatibility:
    loading is always low-memory and safetensors-only, and no remote code is ever run.
    """
    from .modeling import check_attn_implementation, empty_weights

    bnb_config = None
    if quantization_config is not None:
        from .bnb import BitsAndBytesConfig

        bnb_config = BitsAndBytesConfig.coerce(quantization_config)
        if quantize is not None:
            raise ValueError("pass either quantization_config or quantize=, not both")
    if use_safetensors is False:
        raise ValueError("use_safetensors=False is not supported: only safetensors checkpoints are loaded")
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass only dtype")
    dtype = dtype if dtype is not None else torch_dtype
    if attn_implementation is not None:
        check_attn_implementation(attn_implementation)
    target_device = parse_device(device, device_map)
    placements = normalize_device_map(device_map) if spreads_devices(device_map) else None

    hub_kwargs = {k: v for k, v in dict(revision=revision, cache_dir=cache_dir, token=token).items() if v}
    if local_files_only:
        hub_kwargs["local_files_only"] = True
    directory = resolve_checkpoint_dir(pretrained_model_name_or_path, **hub_kwargs)
    config_path = os.path.join(directory, CONFIG_NAME)
    if config is None:
        if not os.path.isfile(config_path):
            raise CheckpointError(
                f"{config_path} not found: {directory} is not an Idefics2 checkpoint directory "
                f"(expected {CONFIG_NAME} and {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME})"
            )
        config = Idefics2Config.from_json_file(config_path)
    if attn_implementation is not None:
        config.attn_implementation = attn_implementation

    state, origin = collect_state_dict(directory)
    target_dtype = parse_dtype(dtype, config, state)

    stored_quantization = config.extra.get("quantization_config")
    if max_memory is not None and not (isinstance(device_map, str) and device_map in PLANNED_MAPS):
        raise ValueError(f"max_memory= goes with device_map='auto', 'balanced' or 'sequential', not {device_map!r}")
    if isinstance(device_map, str) and device_map in PLANNED_MAPS:
        quantizing = quantize is not None or bnb_config is not None or stored_quantization is not None
        converts = any(t.is_floating_point() and t.dtype != target_dtype for t in state.values())
        device_map = plan_string_map(cls, config, target_dtype, device_map, max_memory, quantizing,
                                     disk_allowed=not converts or offload_folder is not None)
        target_device = parse_device(None, device_map)
        placements = normalize_device_map(device_map) if spreads_devices(device_map) else None
    if placements is not None and (quantize is not None or bnb_config is not None or stored_quantization):
        raise ValueError("a device_map dict over several devices cannot be combined with quantization yet; "
                         "quantize on one device (device_map='cpu' or 'cuda')")
    prequantized_bnb: dict[str, torch.Tensor] = {}
    bnb_names: set[str] = set()
    if stored_quantization is not None:
        method = stored_quantization.get("quant_method")
        if method not in ("idefics2", "bitsandbytes"):
            raise NotImplementedError(f"checkpoints quantized with {method!r} are not supported yet")
        if quantize is not None or bnb_config is not None:
            raise ValueError(f"{directory} is already quantized ({method}); drop quantize= / quantization_config=")
        if method == "bitsandbytes":
            from .bnb import BitsAndBytesConfig, prequantized_names

            bnb_config = BitsAndBytesConfig.from_dict(stored_quantization)
            bnb_names = prequantized_names(state)
            for key in [k for k in state if any(k.startswith(n + ".") for n in bnb_names)]:
                prequantized_bnb[key] = state.pop(key)
            stored_quantization = None  # the layers are rebuilt after the float part is loaded
    with empty_weights():
        model = cls(config)
        if stored_quantization is not None:
            from .quantize import prepare_quantized_skeleton

            prepare_quantized_skeleton(model, stored_quantization)
    prefix = cls.checkpoint_prefix
    expected = {name: p for name, p in model.state_dict(keep_vars=True).items()}
    if prefix:  # loading the base model: drop the head, strip the prefix
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    for name in bnb_names:  # rebuilt by bitsandbytes from the popped tensors below
        expected.pop(f"{name.removeprefix(prefix)}.weight", None)

    converts = any(t.is_floating_point() and t.dtype != target_dtype for t in state.values())
    quantized = quantize is not None or bnb_config is not None or stored_quantization is not None
    check_placement(target_device, device_map, model, config, target_dtype, converts and not quantized,
                    offload_folder=offload_folder, quantized=quantized)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{n} (checkpoint {tuple(state[n].shape)} vs model {tuple(expected[n].shape)} in {origin.get(prefix + n)})"
        for n in sorted(set(state) & set(expected))
        if tuple(state[n].shape) != tuple(expected[n].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors: {_describe(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_describe(unexpected)}")
    if mismatched:
        problems.append(f"tensors with the wrong shape: {_describe(mismatched)}")
    if problems:
        raise CheckpointError(f"The checkpoint in {directory} does not fit its config: " + "; ".join(problems))

    from .quantize import QuantizedLinear

    keep_dtype = {  # quantized weights and their scales stay exactly as stored
        f"{module_name}.{buffer_name}"
        for module_name, module in model.named_modules() if isinstance(module, QuantizedLinear)
        for buffer_name, _ in module.named_buffers()
    }
    loaded = {}
    offload = _OffloadWriter(offload_folder) if placements is not None and offload_folder is not None else None
    for name, param in expected.items():
        tensor = state.pop(name)
        if name in keep_dtype:
            # Used as stored (a view of the file) by idefics2's kernels; torch's own int8/int4 ops, used where
            # those cannot be built, assume aligned buffers, and a file view is only 8-byte aligned.
            on_file = target_device.type == "cpu" and kernels.kernel_available()
            loaded[name] = tensor.to(device=target_device) if on_file else tensor.to(device=target_device).clone()
            continue
        want = target_dtype if param.is_floating_point() else param.dtype
        if placements is None:
            loaded[name] = tensor.to(device=target_device, dtype=want)  # no copy when already right
        else:
            placed = _place(name, tensor.to(dtype=want), placements, target_device, offload, loaded)
            if placed is not None:  # else the offload writer fills it in
                loaded[name] = placed
        del tensor
    if offload is not None:
        offload.flush(loaded)
    missing_after = model.load_state_dict(loaded, assign=True, strict=False).missing_keys
    del loaded
    if set(missing_after) != {f"{n.removeprefix(prefix)}.weight" for n in bnb_names}:
        raise CheckpointError(f"internal error: unassigned tensors {sorted(missing_after)[:5]}")
    if bnb_names:
        from .bnb import load_prequantized

        load_prequantized(model, {k.removeprefix(prefix): v for k, v in prequantized_bnb.items()},
                          {n.removeprefix(prefix) for n in bnb_names}, bnb_config, target_device)
    model.tie_weights()
    model.reset_buffers(target_device)
    model.set_attn_implementation(config.attn_implementation)
    if placements is not None:
        from .dispatch import dispatch_model

        dispatch_model(model, placements, target_device)
    model.config.extra["dtype"] = str(target_dtype).removeprefix("torch.")
    if quantize is not None:
        from .quantize import quantize_model

        quantize_model(model, quantize, group_size=quantize_group_size, lm_head=quantize_lm_head)
    elif bnb_config is not None and not bnb_names:
        from .bnb import quantize_with_bnb

        quantize_with_bnb(model, bnb_config, target_device)
    _attach_generation_config(model, directory)
    return model.eval()


def is_file_view(tensor: torch.Tensor) -> bool:
    """Whether `tensor` reads a file mapping (a CPU storage torch did not allocate) rather than memory of its own."""
    return tensor.device.type == "cpu" and (tensor.numel() == 0 or not tensor.untyped_storage().resizable())


def _place(name: str, tensor: torch.Tensor, placements: dict[str, str], main: torch.device,
           offload: _OffloadWriter | None, loaded: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Put one tensor (already in its final dtype) where a device_map dict over several devices says: a GPU;
    "cpu" = memory of its own; "disk" = a file mapping (the checkpoint's, or offload_folder's for tensors
    made at load). None when it went to the offload writer, which fills in `loaded` later."""
    from .dispatch import covering_key

    key = covering_key(name, placements)
    where = placements[key] if key is not None else str(main)  # buffers the map does not cover
    if where == "cpu":
        return tensor.clone() if is_file_view(tensor) else tensor
    if where != "disk":
        return tensor.to(torch.device(where))
    if is_file_view(tensor):
        return tensor
    if offload is None:
        raise ValueError(f"device_map[{key!r}] = 'disk': {name} is made at load (converted or joined from "
                         "several tensors); pass offload_folder=DIR to write it there and map it")
    offload.add(name, tensor, loaded)
    return None


class _OffloadWriter:
    """Writes "disk" tensors made at load to `folder` as safetensors, about `chunk_bytes` a file, and hands
    back zero-copy views of the written files (so at most one chunk is held in memory)."""

    PATTERN = re.compile(r"idefics2-offload-\d{5}\.safetensors")

    def __init__(self, folder: str | os.PathLike, chunk_bytes: int = 512 * 2**20) -> None:
        self.folder = os.fspath(folder)
        self.chunk_bytes = chunk_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files = 0
        os.makedirs(self.folder, exist_ok=True)
        for stale in os.listdir(self.folder):  # a mapping of an earlier file keeps its inode: removing is safe
            if self.PATTERN.fullmatch(stale):
                os.remove(os.path.join(self.folder, stale))

    def add(self, name: str, tensor: torch.Tensor, loaded: dict[str, torch.Tensor]) -> None:
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= self.chunk_bytes:
            self.flush(loaded)

    def flush(self, loaded: dict[str, torch.Tensor]) -> None:
        if not self.pending:
            return
        self.files += 1
        path = os.path.join(self.folder, f"idefics2-offload-{self.files:05d}.safetensors")
        partial = path + ".partial"
        save_file(self.pending, partial, metadata={"format": "pt"})
        os.replace(partial, path)
        self.pending.clear()
        self.pending_bytes = 0
        loaded.update(read_safetensors(path))


def _attach_generation_config(model, directory: str) -> None:
    from .generation import GenerationConfig

    if hasattr(model, "generation_config"):
        model.generation_config = GenerationConfig.from_pretrained(directory)


# ---- save ----------------------------------------------------------------------------------------------------
def parse_size(size: int | str) -> int:
    """'5GB' -> 5e9 bytes, '2GiB' -> 2*2**30 (the transformers convention)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size={size!r} is not a size like '5GB', '500MB' or a number of bytes")
    value, unit = float(match.group(1)), match.group(2).upper()
    powers = {"B": 0, "KB": 1, "MB": 2, "GB": 3, "TB": 4, "KIB": 1, "MIB": 2, "GIB": 3, "TIB": 4}
    base = 1024 if "I" in unit else 1000
    return int(value * base ** powers[unit])


def save_pretrained(model, save_directory: str | os.PathLike, max_shard_size: int | str = "5GB",
                    safe_serialization: bool = True, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write config.json and model.safetensors, or shards + model.safetensors.index.json above max_shard_size."""
    if not safe_serialization:
        raise ValueError("Only safetensors are written (safe_serialization=False is not supported)")
    directory = os.fspath(save_directory)
    os.makedirs(directory, exist_ok=True)
    if state_dict is None:
        state_dict = model.state_dict()
    if model.config.tie_word_embeddings:
        state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    config = model.config
    config.extra["dtype"] = str(model.dtype).removeprefix("torch.")
    config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)

    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + nbytes > limit:
            shards.append({})
            shard_bytes = 0
        # safetensors needs contiguous, unshared CPU tensors.
        shards[-1][name] = tensor.detach().to("cpu").contiguous()
        shard_bytes += nbytes
    for stale in os.listdir(directory):  # leftovers of an earlier save would confuse loaders
        if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", stale):
            os.remove(os.path.join(directory, stale))
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
        return
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, filename), metadata={"format": "pt"})
        for name, tensor in shard.items():
            weight_map[name] = filename
            total += tensor.numel() * tensor.element_size()
    with open(os.path.join(directory, WEIGHTS_INDEX_NAME), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
        f.write("\n")
