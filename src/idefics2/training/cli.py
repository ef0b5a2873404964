"""`idefics2 finetune` and `idefics2 merge-lora`: `register(subparsers)` adds both to an argparse CLI."""

from __future__ import annotations

import argparse
import os

from .lora import DEFAULT_LORA_TARGET


def _user_error(message: str) -> Exception:
    from ..cli import UserError

    return UserError(message)


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def cmd_finetune(args: argparse.Namespace) -> int:
    from .data import DataError
    from .lora import TrainingSetupError
    from .trainer import TrainConfig, finetune

    freeze = [part.strip() for part in (args.freeze or "").split(",") if part.strip()]
    if freeze and args.method != "full":
        raise _user_error("--freeze applies to --method full (LoRA trains only its adapters)")
    if args.fsdp and args.method != "full":
        raise _user_error("--fsdp shards full fine-tuning: use it with --method full")
    if args.resume and args.resume != "auto" and not os.path.isdir(args.resume):
        raise _user_error(f"--resume {args.resume!r} is not a directory")
    config = TrainConfig(
        model=args.model, train_file=args.train, validation_file=args.validation, output_dir=args.output,
        method=args.method, lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        lora_target=args.lora_target, use_dora=args.use_dora, freeze=freeze, learning_rate=args.learning_rate,
        weight_decay=args.weight_decay, lr_scheduler=args.lr_scheduler, warmup_steps=args.warmup_steps,
        warmup_ratio=args.warmup_ratio, batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, epochs=args.epochs, max_steps=args.max_steps,
        max_grad_norm=args.max_grad_norm, bf16=args.bf16, dtype=args.dtype,
        gradient_checkpointing=args.gradient_checkpointing, max_length=args.max_length,
        on_long="error" if args.error_on_long else "drop", train_on_all_text=args.train_on_all_text,
        image_splitting=False if args.no_image_splitting else None, logging_steps=args.logging_steps,
        eval_steps=args.eval_steps, save_steps=args.save_steps, save_total_limit=args.save_total_limit,
        seed=args.seed, resume=args.resume, fsdp=args.fsdp, progress=not args.no_progress, threads=args.threads,
        device=args.device, memory_pool=not args.no_memory_pool,
    )
    if not os.path.isdir(args.model):
        raise _user_error(f"model directory {args.model!r} does not exist")
    try:
        finetune(config)
    except (DataError, TrainingSetupError) as e:
        raise _user_error(str(e)) from e
    return 0


def cmd_merge_lora(args: argparse.Namespace) -> int:
    from .lora import TrainingSetupError, merge_adapter

    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise _user_error(f"{args.model!r} has no config.json: not an Idefics2 checkpoint directory")
    if not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
        raise _user_error(f"{args.adapter!r} has no adapter_config.json: not a peft adapter directory")
    if os.path.isdir(args.output) and os.listdir(args.output) and not args.force:
        raise _user_error(f"{args.output!r} exists and is not empty (use --force to overwrite)")
    try:
        merge_adapter(args.model, args.adapter, args.output, dtype=None if args.dtype == "auto" else args.dtype)
    except TrainingSetupError as e:
        raise _user_error(str(e)) from e
    print(f"merged {args.adapter} into {args.model} -> {args.output}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `finetune` and `merge-lora` subcommands to an argparse subparsers object."""
    p = subparsers.add_parser(
        "finetune", help="fine-tune on chat JSONL (LoRA / DoRA / QLoRA / full); runs under torchrun too",
        description="Fine-tune Idefics2 on JSONL chat data: {\"messages\": [...], \"images\": [paths]} per line. "
                    "Loss on assistant turns only. Multi-process: torchrun --nproc-per-node N -m idefics2 finetune, or "
                    "accelerate launch --multi_gpu --num_processes N -m idefics2 finetune (CPU too)")
    g = p.add_argument_group("data")
    g.add_argument("--model", required=True, help="base checkpoint directory (config.json + safetensors + processor)")
    g.add_argument("--train", required=True, metavar="JSONL", help="training data (image paths relative to it)")
    g.add_argument("--validation", metavar="JSONL", help="optional validation data for the evaluation loss")
    g.add_argument("--output", required=True, help="output directory: adapter or model, checkpoints, metrics.jsonl")
    g.add_argument("--max-length", type=int, default=2048,
                   help="token limit per sample (images included); longer samples are dropped, never cut (2048)")
    g.add_argument("--error-on-long", action="store_true",
                   help="stop with an error instead of dropping samples longer than --max-length")
    g.add_argument("--train-on-all-text", action="store_true",
                   help="loss on every text token (system/user turns too), not only on assistant turns")
    g.add_argument("--no-image-splitting", action="store_true",
                   help="do not split images into 4 crops + the original (5x fewer image tokens)")
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=["lora", "qlora", "full"], default="lora",
                   help="lora (default), qlora (4-bit NF4 base via bitsandbytes, CPU or CUDA) or full fine-tuning")
    g.add_argument("--lora-r", type=_positive, default=8, help="LoRA rank (default 8)")
    g.add_argument("--lora-alpha", type=int, default=8, help="LoRA alpha (default 8)")
    g.add_argument("--lora-dropout", type=float, default=0.1, help="LoRA dropout (default 0.1)")
    g.add_argument("--lora-target", default=DEFAULT_LORA_TARGET,
                   help="regex over module names to adapt (default: text decoder, modality projection and "
                        "perceiver projections; the vision tower stays frozen unless the regex includes it)")
    g.add_argument("--use-dora", action="store_true", help="weight-decomposed LoRA (DoRA)")
    g.add_argument("--freeze", metavar="PARTS",
                   help="with --method full: comma-separated parts to keep frozen: vision, connector, text")
    g.add_argument("--fsdp", action="store_true", help="shard full fine-tuning across processes (FSDP2)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--learning-rate", "--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on matrices (default 0)")
    g.add_argument("--lr-scheduler", choices=["cosine", "linear", "constant"], default="cosine",
                   help="decay after warmup (default cosine)")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps (default 0)")
    g.add_argument("--warmup-ratio", type=float, default=0.0, help="warmup as a fraction of all steps (if no steps)")
    g.add_argument("--batch-size", type=_positive, default=1, help="samples per process per micro-batch (1)")
    g.add_argument("--gradient-accumulation-steps", type=_positive, default=1,
                   help="micro-batches per optimizer step (default 1)")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the data (default 1)")
    g.add_argument("--max-steps", type=_positive, help="optimizer steps (overrides --epochs)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (default 1.0)")
    g.add_argument("--bf16", choices=["auto", "yes", "no"], default="auto",
                   help="bf16 autocast: auto = on CUDA GPUs that support it (default), off on CPU")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="base weight dtype: auto = bfloat16 for LoRA with bf16 autocast, else float32")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward (less memory, ~30%% slower; works with LoRA)")
    g.add_argument("--seed", type=int, default=0, help="seed for data order and adapter init (default 0)")
    g.add_argument("--threads", type=int, help="CPU threads for torch")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to train: auto = the process's CUDA GPU when one is visible, else CPU (default)")
    g.add_argument("--no-memory-pool", action="store_true",
                   help="on the CPU, leave activation memory to the C library's allocator instead of the pool that "
                        "reuses freed blocks between steps (the pool keeps peak RSS lower and avoids page faults)")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--logging-steps", type=_positive, default=1, help="append metrics every N steps (default 1)")
    g.add_argument("--eval-steps", type=_positive, help="evaluation loss every N steps (and at the end)")
    g.add_argument("--save-steps", type=_positive, help="write a resumable checkpoint every N steps")
    g.add_argument("--save-total-limit", type=int, default=2, help="keep the last K checkpoints (default 2)")
    g.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                   help="resume from the latest checkpoint in --output, or from CHECKPOINT")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (metrics.jsonl is still written)")
    p.set_defaults(func=cmd_finetune)

    p = subparsers.add_parser("merge-lora", help="merge a LoRA adapter into its base model -> a full checkpoint")
    p.add_argument("--model", required=True, help="base checkpoint directory the adapter was trained on")
    p.add_argument("--adapter", required=True, help="adapter directory (adapter_config.json + safetensors)")
    p.add_argument("--output", required=True, help="output checkpoint directory")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="dtype of the merged weights (default: the base checkpoint's)")
    p.add_argument("--force", action="store_true", help="write into a non-empty output directory")
    p.set_defaults(func=cmd_merge_lora)
