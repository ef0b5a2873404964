"""Fine-tuning: chat JSONL data, label-masking collator, LoRA / DoRA / QLoRA / full tuning, exact resume, DDP/FSDP.

The package imports `peft` only for LoRA (`pip install 'idefics2[train]'`)."""

from .data import (
    IGNORE_INDEX,
    ChatCollator,
    DataError,
    Sample,
    filter_by_length,
    load_jsonl,
    target_positions,
)
from .lora import DEFAULT_LORA_TARGET, apply_lora, expected_lora_parameters, fuse_lora_dropout, merge_adapter
from .trainer import TrainConfig, Trainer, finetune

__all__ = [
    "DEFAULT_LORA_TARGET", "IGNORE_INDEX", "ChatCollator", "DataError", "Sample", "TrainConfig", "Trainer",
    "apply_lora", "expected_lora_parameters", "filter_by_length", "finetune", "fuse_lora_dropout", "load_jsonl",
    "merge_adapter", "target_positions",
]
