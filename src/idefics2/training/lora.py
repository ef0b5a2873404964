"""LoRA / DoRA / QLoRA setup with `peft`, tower freezing, and adapter merging."""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from torch import nn

# The published Idefics2 fine-tuning recipe: the text decoder's projections, the modality projection MLP and the
# perceiver resampler; the vision tower stays frozen.
DEFAULT_LORA_TARGET = (
    r".*(text_model|connector\.modality_projection|connector\.perceiver_resampler)"
    r".*(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|o_proj).*$"
)
TOWERS = {
    "vision": ("model.vision_model.",),
    "connector": ("model.connector.",),
    "text": ("model.text_model.", "lm_head."),
}


class TrainingSetupError(ValueError):
    """A configuration that cannot train (missing dependency, bad regex, nothing trainable)."""


def require_peft() -> Any:
    try:
        import peft
    except ImportError as e:
        raise TrainingSetupError(
            "LoRA needs the 'peft' package: pip install 'idefics2[train]' (or pip install peft)"
        ) from e
    return peft


def lora_target_modules(model: nn.Module, pattern: str) -> list[str]:
    """Names of the nn.Linear modules whose full name matches `pattern` (peft's regex semantics: fullmatch)."""
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise TrainingSetupError(f"--lora-target {pattern!r} is not a valid regular expression: {e}") from e
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and regex.fullmatch(n)]
    if not names:
        raise TrainingSetupError(f"--lora-target {pattern!r} matches no linear layer of the model")
    return names


def expected_lora_parameters(model: nn.Module, pattern: str, r: int, use_dora: bool = False) -> int:
    """r * (in + out) per targeted linear (+ out for DoRA's magnitude vector)."""
    modules = dict(model.named_modules())
    total = 0
    for name in lora_target_modules(model, pattern):
        linear = modules[name]
        total += r * (linear.in_features + linear.out_features) + (linear.out_features if use_dora else 0)
    return total


def apply_lora(model: nn.Module, r: int = 8, alpha: int = 8, dropout: float = 0.1, target: str | None = None,
               use_dora: bool = False) -> nn.Module:
    """Freeze the model and wrap it in a peft LoRA (or DoRA) model over `target` (regex over module names)."""
    peft = require_peft()
    target = target or DEFAULT_LORA_TARGET
    lora_target_modules(model, target)  # validate early, with a clear message
    for p in model.parameters():
        p.requires_grad_(False)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target,
                             use_dora=use_dora, init_lora_weights="gaussian", bias="none")
    return peft.get_peft_model(model, config)


def freeze(model: nn.Module, towers: list[str]) -> None:
    """Freeze `vision`, `connector` and/or `text` (decoder + lm_head) for full fine-tuning."""
    for tower in towers:
        if tower not in TOWERS:
            raise TrainingSetupError(f"--freeze: unknown part {tower!r}; choose from {sorted(TOWERS)}")
    prefixes = tuple(p for t in towers for p in TOWERS[t])
    for name, p in model.named_parameters():
        if name.startswith(prefixes):
            p.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise TrainingSetupError("--freeze leaves no trainable parameter")


def quantize_for_qlora(model: nn.Module, device: torch.device, compute_dtype: torch.dtype) -> nn.Module:
    """Replace the text decoder's and connector's linears by bitsandbytes 4-bit NF4 linears (QLoRA base)."""
    if device.type != "cuda":
        raise TrainingSetupError("--method qlora needs a CUDA GPU (bitsandbytes 4-bit kernels); this machine has "
                                 "none: use --method lora on CPU")
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise TrainingSetupError("--method qlora needs bitsandbytes: pip install bitsandbytes") from e
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n.startswith(("model.text_model.", "model.connector."))]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4", quant_storage=torch.uint8,
                              device="meta")
        q.weight = bnb.nn.Params4bit(linear.weight.data.to(compute_dtype).cpu(), requires_grad=False,
                                     quant_type="nf4", compress_statistics=True)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
        setattr(parent, child, q.to(device))
    return model.to(device)


def merge_adapter(model_dir: str, adapter_dir: str, output_dir: str, dtype: str | None = None) -> None:
    """Base checkpoint + peft adapter -> a full checkpoint (published layout, processor files copied)."""
    import shutil

    from ..modeling import Idefics2ForConditionalGeneration

    peft = require_peft()
    model = Idefics2ForConditionalGeneration.from_pretrained(model_dir, dtype=dtype)
    merged = peft.PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.save_pretrained(output_dir)
    for source in (adapter_dir, model_dir):  # processor files: the adapter dir's (written at training) first
        for name in os.listdir(source):
            if name in ("config.json", "generation_config.json") or name.endswith((".safetensors", ".json.index")):
                continue
            if name.startswith(("adapter_", "model.safetensors")) or not os.path.isfile(os.path.join(source, name)):
                continue
            if name.endswith((".json", ".jinja", ".model")) and not os.path.exists(os.path.join(output_dir, name)):
                shutil.copyfile(os.path.join(source, name), os.path.join(output_dir, name))
    generation = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(generation) and not os.path.exists(os.path.join(output_dir, "generation_config.json")):
        shutil.copyfile(generation, os.path.join(output_dir, "generation_config.json"))
