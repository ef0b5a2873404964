"""The fine-tuning loop: AdamW, warmup + cosine/linear schedule, gradient accumulation and clipping, bf16 autocast,
gradient checkpointing, evaluation, checkpoints with exact resume, DDP / FSDP under torchrun.

Exactness: the data order is a function of (seed, epoch) only and the position is the optimizer step, so a resumed
run reads the same batches; model / adapter weights (safetensors), optimizer, scheduler and RNG states
(`torch.load(weights_only=True)`) are restored. The loss of a step is the mean over all target tokens of all its
micro-batches on all processes (`num_items_in_batch`), so N processes x batch b == 1 process x batch N*b.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .. import kernels
from .data import IGNORE_INDEX, ChatCollator, Sample, filter_by_length, load_jsonl, target_positions
from .lora import (
    DEFAULT_LORA_TARGET,
    TrainingSetupError,
    apply_lora,
    count_4bit_linears,
    freeze,
    quantize_for_qlora,
    require_bitsandbytes,
)

logger = logging.getLogger("idefics2.training")
STATE_FILE = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class TrainConfig:
    model: str
    train_file: str
    output_dir: str
    validation_file: str | None = None
    method: str = "lora"  # lora | qlora | full
    lora_r: int = 8
    lora_alpha: int = 8
    lora_dropout: float = 0.1
    lora_target: str = DEFAULT_LORA_TARGET
    use_dora: bool = False
    freeze: list[str] = field(default_factory=list)
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    batch_size: int = 1  # per process
    gradient_accumulation_steps: int = 1
    epochs: float = 1.0
    max_steps: int | None = None
    max_grad_norm: float = 1.0
    bf16: str = "auto"  # auto | yes | no
    dtype: str = "auto"  # base weight dtype: auto | float32 | bfloat16
    gradient_checkpointing: bool = False
    max_length: int | None = 2048
    on_long: str = "drop"  # drop | error
    train_on_all_text: bool = False
    image_splitting: bool | None = None
    logging_steps: int = 1
    eval_steps: int | None = None
    save_steps: int | None = None
    save_total_limit: int | None = 2
    seed: int = 0
    resume: str | None = None  # "auto" (latest in output_dir) or a checkpoint directory
    fsdp: bool = False
    progress: bool = True
    threads: int | None = None
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda
    memory_pool: bool = True  # CPU: activations and gradients from kernels.cpu_memory_pool


# ---- distributed ---------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            value = value.to(self.device)
            torch.distributed.all_reduce(value)
        return value

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


# Launchers: torchrun and `accelerate launch --multi_gpu` (torch's elastic agent underneath, also on CPU-only
# machines) set RANK / WORLD_SIZE / LOCAL_RANK; mpirun (`accelerate launch --cpu --mpirun_hostfile`) sets the MPI
# names (Intel MPI / MPICH, Open MPI, MVAPICH), read in that order after torch's own.
_RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_LOCAL_RANK_VARS = ("LOCAL_RANK", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK")


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError as e:
                raise TrainingSetupError(f"environment variable {name}={value!r} is not an integer") from e
    return default


def init_distributed(device: str = "auto") -> Dist:
    """The process group the launcher asked for (gloo on CPU, NCCL on CUDA); one process when none did."""
    world = _env_int(_WORLD_VARS, 1)
    rank = _env_int(_RANK_VARS, 0)
    local_rank = _env_int(_LOCAL_RANK_VARS, 0)
    if world == 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") \
            and "MASTER_ADDR" in os.environ:
        # `accelerate launch --cpu --num_processes N` without --mpirun_hostfile starts one plain process (it sets
        # MASTER_ADDR only when asked for several): training alone would silently change the global batch.
        raise TrainingSetupError(
            "accelerate launch --cpu started a single process (several CPU processes need its mpirun mode): use "
            "accelerate launch --multi_gpu --num_processes N (DDP, gloo on CPU) or torchrun --nproc-per-node N")
    if world > 1 and not ("MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ):
        raise TrainingSetupError(f"{world} processes but MASTER_ADDR / MASTER_PORT are not set: launch with "
                                 "torchrun or accelerate launch, or export both")
    if device not in ("auto", "cpu", "cuda"):
        raise TrainingSetupError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainingSetupError("--device cuda: no CUDA GPU is visible (use --device cpu or auto)")
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda and local_rank >= torch.cuda.device_count():
        raise TrainingSetupError(
            f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} CUDA device(s) are visible on this "
            f"machine; start at most that many processes per machine, or hide the GPUs (CUDA_VISIBLE_DEVICES=) "
            f"to train on CPU with gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, local_rank, device)


# ---- schedule ------------------------------------------------------------------------------------------------
def lr_lambda(kind: str, warmup: int, total: int):
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        progress = min(1.0, progress)
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


# ---- checkpoints ---------------------------------------------------------------------------------------------
def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit() \
                and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(name[len(CHECKPOINT_PREFIX):]), path))
    return sorted(found)


def peak_memory(device: torch.device) -> dict[str, float]:
    """This process's peak memory so far, in MiB: what torch allocated on a GPU (and the allocator's reserve,
    which is what nvidia-smi shows), or the peak resident set on the CPU."""
    if device.type == "cuda":
        return {"peak_gpu_allocated_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
                "peak_gpu_reserved_mib": round(torch.cuda.max_memory_reserved(device) / 2**20, 1)}
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        return {"peak_rss_mib": round(kib / 1024, 1)}
    except (OSError, StopIteration, ValueError):  # not Linux
        return {}


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Trainer:
    def __init__(self, config: TrainConfig) -> None:
        self.cfg = config
        self.dist = init_distributed(config.device)
        if config.threads:
            torch.set_num_threads(config.threads)
        if config.method not in ("lora", "qlora", "full"):
            raise TrainingSetupError(f"--method must be lora, qlora or full, got {config.method!r}")
        if config.fsdp and config.method != "full":
            raise TrainingSetupError("--fsdp shards full fine-tuning; use --method full (LoRA runs with DDP)")
        if config.batch_size < 1 or config.gradient_accumulation_steps < 1:
            raise TrainingSetupError("--batch-size and --gradient-accumulation-steps must be >= 1")
        dev = self.dist.device
        if config.bf16 == "auto":
            self.autocast = dev.type == "cuda" and torch.cuda.is_bf16_supported()
        else:
            self.autocast = config.bf16 == "yes"
        self.metrics_path = os.path.join(config.output_dir, "metrics.jsonl")
        self.tb = None

    # -- setup ----------------------------------------------------------------------------------------------
    def resume_path(self) -> str | None:
        resume = self.cfg.resume
        if not resume:
            return None
        if resume == "auto":
            found = list_checkpoints(self.cfg.output_dir)
            return found[-1][1] if found else None
        if not os.path.isfile(os.path.join(resume, STATE_FILE)):
            raise TrainingSetupError(f"--resume {resume!r} is not a checkpoint directory (no {STATE_FILE})")
        return resume

    def build(self) -> None:
        from ..modeling import Idefics2ForConditionalGeneration
        from ..processing import Idefics2Processor

        cfg, dev = self.cfg, self.dist.device
        if not os.path.isfile(os.path.join(cfg.model, "config.json")):
            raise TrainingSetupError(f"{cfg.model!r} has no config.json: not an Idefics2 checkpoint directory")
        self.processor = Idefics2Processor.from_pretrained(cfg.model)
        if cfg.image_splitting is not None:
            self.processor.image_processor.do_image_splitting = cfg.image_splitting
        self.collator = ChatCollator(self.processor, train_on_all_text=cfg.train_on_all_text)
        self.train_samples = filter_by_length(load_jsonl(cfg.train_file), self.collator, cfg.max_length, cfg.on_long)
        self.eval_samples: list[Sample] = []
        if cfg.validation_file:
            self.eval_samples = filter_by_length(load_jsonl(cfg.validation_file), self.collator, cfg.max_length,
                                                 cfg.on_long)

        self.resume_dir = self.resume_path()
        dtype = cfg.dtype
        if dtype == "auto":
            dtype = "bfloat16" if (cfg.method != "full" and self.autocast) else "float32"
        if cfg.method == "qlora":
            require_bitsandbytes()  # before the (possibly long) load
        source = cfg.model
        if cfg.method == "full" and self.resume_dir:
            source = self.resume_dir  # full checkpoints are complete model directories
        model = Idefics2ForConditionalGeneration.from_pretrained(source, dtype=dtype)
        if cfg.method == "full":  # weights are copy-on-write views of the file: give trained ones their memory
            for p in model.parameters():
                p.data = p.data.clone()
        model.train()
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.quantized_layers = 0
        if cfg.method == "qlora":
            # NF4 layers compute in the autocast dtype: bfloat16 on CUDA, float32 on the CPU (exact there).
            self.qlora_compute_dtype = torch.bfloat16 if self.autocast else torch.float32
            model = quantize_for_qlora(model, dev, self.qlora_compute_dtype)
            self.quantized_layers = count_4bit_linears(model)
        else:
            model = model.to(dev)
        torch.manual_seed(cfg.seed)  # adapter initialisation (gaussian A) is part of the run's seed
        if cfg.method in ("lora", "qlora"):
            model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target, cfg.use_dora)
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
            if self.resume_dir:
                from peft import set_peft_model_state_dict
                from safetensors.torch import load_file

                set_peft_model_state_dict(model, load_file(os.path.join(self.resume_dir,
                                                                        "adapter_model.safetensors")))
        else:
            freeze(model, cfg.freeze)
        self.model = model
        self.wrapped = self._wrap(model)  # FSDP swaps in sharded parameters: collect them afterwards
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in self.trainable if p.dim() >= 2]
        no_decay = [p for p in self.trainable if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8,
        )
        self.global_batch = cfg.batch_size * cfg.gradient_accumulation_steps * self.dist.world
        self.steps_per_epoch = len(self.train_samples) // self.global_batch
        if self.steps_per_epoch == 0:
            raise TrainingSetupError(
                f"{len(self.train_samples)} training sample(s) is less than one global batch of {self.global_batch}"
                " (batch size x accumulation x processes)")
        self.total_steps = cfg.max_steps or max(1, int(cfg.epochs * self.steps_per_epoch))
        warmup = cfg.warmup_steps or int(cfg.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.lr_scheduler, warmup, self.total_steps))
        self.step = 0
        if self.resume_dir:
            self._load_state(self.resume_dir)

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.dist.world == 1:
            return model
        if self.cfg.fsdp:
            from torch.distributed.fsdp import fully_shard

            from ..text import MistralDecoderLayer
            from ..vision import Idefics2EncoderLayer

            for module in model.modules():
                if isinstance(module, (MistralDecoderLayer, Idefics2EncoderLayer)):
                    fully_shard(module)
            fully_shard(model)
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.dist.local_rank] if self.dist.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    # -- data -----------------------------------------------------------------------------------------------
    def step_samples(self, step: int) -> list[list[Sample]]:
        """This process's micro-batches for optimizer step `step` (a pure function of seed, epoch, position)."""
        cfg = self.cfg
        epoch, position = divmod(step, self.steps_per_epoch)
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.train_samples), generator=generator).tolist()
        chunk = order[position * self.global_batch:(position + 1) * self.global_batch]
        b, world, rank = cfg.batch_size, self.dist.world, self.dist.rank
        micro = []
        for a in range(cfg.gradient_accumulation_steps):
            start = a * b * world + rank * b
            micro.append([self.train_samples[i] for i in chunk[start:start + b]])
        return micro

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.dist.device) for k, v in batch.items()}

    @staticmethod
    def _targets(labels: torch.Tensor) -> int:
        return int((labels[:, 1:] != IGNORE_INDEX).sum())

    def _autocast(self):
        return torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    # -- loop -----------------------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        batches = [self.collator(samples) for samples in self.step_samples(step)]
        n_items = self.dist.all_sum(torch.tensor(sum(self._targets(b["labels"]) for b in batches),
                                                 dtype=torch.float64))
        n_items = max(1.0, float(n_items))
        total = torch.zeros((), dtype=torch.float64)
        for i, batch in enumerate(batches):
            batch = self._to_device(batch)
            sync = i == len(batches) - 1
            context = self.wrapped.no_sync() if (not sync and hasattr(self.wrapped, "no_sync")) \
                else contextlib.nullcontext()
            with context:
                with self._autocast():
                    out = self.wrapped(**batch, num_items_in_batch=n_items,
                                       logits_to_keep=target_positions(batch["labels"]))
                # DDP / FSDP average gradients over processes: scale so the step's gradient is the global mean.
                (out.loss * self.dist.world).backward()
            total += out.loss.detach().double().cpu()
        loss = float(self.dist.all_sum(total))
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "lr": lr, "grad_norm": float(grad_norm)}

    @torch.no_grad()
    def evaluate(self) -> float:
        self.wrapped.eval()
        b = self.cfg.batch_size
        mine = self.eval_samples[self.dist.rank::self.dist.world]
        total = torch.zeros(2, dtype=torch.float64)
        # Same number of forward calls on every process (FSDP needs all ranks in each forward).
        n_batches = math.ceil(math.ceil(len(self.eval_samples) / self.dist.world) / b)
        for i in range(n_batches):
            samples = mine[i * b:(i + 1) * b] or self.eval_samples[:1]
            batch = self._to_device(self.collator(samples))
            with self._autocast():
                out = self.wrapped(**batch, num_items_in_batch=1, logits_to_keep=target_positions(batch["labels"]))
            if mine[i * b:(i + 1) * b]:
                total += torch.tensor([float(out.loss), self._targets(batch["labels"])], dtype=torch.float64)
        total = self.dist.all_sum(total)
        self.wrapped.train()
        return float(total[0] / max(1.0, float(total[1])))

    def log(self, record: dict[str, Any]) -> None:
        if not self.dist.main:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def train(self) -> str:
        self.build()
        cfg = self.cfg
        if self.dist.main:
            os.makedirs(cfg.output_dir, exist_ok=True)
            if os.path.isfile(self.metrics_path) and os.path.getsize(self.metrics_path):
                with open(self.metrics_path, "rb+") as handle:  # a killed run may have left half a line
                    handle.seek(-1, os.SEEK_END)
                    if handle.read(1) != b"\n":
                        handle.write(b"\n")
            with open(os.path.join(cfg.output_dir, "train_config.json"), "w", encoding="utf-8") as handle:
                json.dump(asdict(cfg), handle, indent=2)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(cfg.output_dir, "runs"))
            except Exception:  # tensorboard not installed: the JSONL log is enough
                self.tb = None
            n_train = sum(p.numel() for p in self.trainable)
            n_all = sum(p.numel() for p in self.model.parameters())
            print(f"idefics2 finetune: {cfg.method}, {n_train:,} trainable / {n_all:,} parameters, "
                  f"{len(self.train_samples)} samples, {self.total_steps} steps of {self.global_batch} samples, "
                  f"{self.dist.world} process(es), device {self.dist.device}, bf16 autocast {self.autocast}"
                  + (f", {self.quantized_layers} linear layers in bitsandbytes 4-bit NF4 (double quant, compute "
                     f"{str(self.qlora_compute_dtype).removeprefix('torch.')})" if self.quantized_layers else "")
                  + (f", resumed at step {self.step}" if self.step else ""), file=sys.stderr)
        bar = None
        if self.dist.main and cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="finetune", dynamic_ncols=True,
                       file=sys.stderr)
        with self._memory_pool():
            self._train_loop(bar)
        self.save_final()
        if self.tb is not None:
            self.tb.close()
        self.dist.barrier()
        return cfg.output_dir

    def _memory_pool(self):
        """On the CPU, a training step's activations and gradients come from a pool that reuses freed blocks
        (`kernels.cpu_memory_pool`): the step allocates gigabytes in the same sizes every time, which glibc's
        heap fragments (peak RSS grows step after step) or, with a low mmap threshold, faults in afresh."""
        if self.cfg.memory_pool and self.dist.device.type == "cpu":
            return kernels.cpu_memory_pool()
        return contextlib.nullcontext()

    def _train_loop(self, bar) -> None:
        cfg = self.cfg
        t_last, samples_since = time.perf_counter(), 0
        while self.step < self.total_steps:
            record = self.train_step(self.step)
            self.step += 1
            samples_since += self.global_batch
            now = time.perf_counter()
            record = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4), **record,
                      "samples_per_s": samples_since / max(now - t_last, 1e-9), **peak_memory(self.dist.device)}
            t_last, samples_since = now, 0
            if self.step % cfg.logging_steps == 0 or self.step == self.total_steps:
                self.log(record)
            if bar is not None:
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                samples_s=f"{record['samples_per_s']:.2f}")
                bar.update(1)
            if self.eval_samples and cfg.eval_steps and self.step % cfg.eval_steps == 0:
                self.log({"step": self.step, "eval_loss": self.evaluate()})
            if cfg.save_steps and self.step % cfg.save_steps == 0 and self.step < self.total_steps:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        if self.eval_samples and not (cfg.eval_steps and self.step % cfg.eval_steps == 0):
            self.log({"step": self.step, "eval_loss": self.evaluate()})

    # -- saving ---------------------------------------------------------------------------------------------
    def _full_state(self) -> dict[str, torch.Tensor]:
        if self.cfg.fsdp and self.dist.world > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                             cpu_offload=True))
        return self.model.state_dict()

    def _optimizer_state(self) -> dict[str, Any]:
        if self.cfg.fsdp and self.dist.world > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.model, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def save_model(self, directory: str) -> None:
        """Adapter (peft layout) for LoRA, the complete model (published layout) for full tuning."""
        if self.cfg.method in ("lora", "qlora"):
            if self.dist.main:
                self.model.save_pretrained(directory, safe_serialization=True)
            return
        state = self._full_state()
        if self.dist.main:
            from ..modeling import Idefics2ForConditionalGeneration

            if self.cfg.fsdp and self.dist.world > 1:
                with torch.device("meta"):
                    shell = Idefics2ForConditionalGeneration(self.model.config)
                shell.load_state_dict(state, assign=True)
                shell.generation_config = getattr(self.model, "generation_config", None)
                shell.save_pretrained(directory)
            else:
                self.model.save_pretrained(directory)

    def save_checkpoint(self) -> None:
        cfg = self.cfg
        final = os.path.join(cfg.output_dir, f"{CHECKPOINT_PREFIX}{self.step}")
        tmp = final + ".tmp"
        if self.dist.main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        self.dist.barrier()
        self.save_model(tmp)
        optimizer_state = self._optimizer_state()
        torch.save(_rng_state(self.dist.device), os.path.join(tmp, f"rng_state_{self.dist.rank}.pt"))
        if self.dist.main:
            torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
            torch.save(self.scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        self.dist.barrier()
        if self.dist.main:
            with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as handle:
                json.dump({"step": self.step, "world_size": self.dist.world, "global_batch": self.global_batch,
                           "method": cfg.method, "seed": cfg.seed}, handle, indent=2)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            if cfg.save_total_limit:
                for _, path in list_checkpoints(cfg.output_dir)[:-cfg.save_total_limit]:
                    shutil.rmtree(path, ignore_errors=True)
        self.dist.barrier()

    def _load_state(self, directory: str) -> None:
        with open(os.path.join(directory, STATE_FILE), encoding="utf-8") as handle:
            state = json.load(handle)
        if state["global_batch"] != self.global_batch:
            raise TrainingSetupError(
                f"{directory} was written with a global batch of {state['global_batch']} samples; this run has "
                f"{self.global_batch}: keep batch size x accumulation x processes the same to resume")
        optimizer_state = torch.load(os.path.join(directory, "optimizer.pt"), map_location="cpu", weights_only=True)
        if self.cfg.fsdp and self.dist.world > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.model, self.optimizer, optimizer_state,
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(
            torch.load(os.path.join(directory, "scheduler.pt"), map_location="cpu", weights_only=True))
        rng = os.path.join(directory, f"rng_state_{self.dist.rank}.pt")
        if os.path.isfile(rng):
            _set_rng_state(torch.load(rng, map_location="cpu", weights_only=True), self.dist.device)
        self.step = int(state["step"])

    def save_final(self) -> None:
        out = self.cfg.output_dir
        self.save_model(out)
        if self.dist.main:
            self.processor.save_pretrained(out)


def finetune(config: TrainConfig) -> str:
    """Run a fine-tuning job; returns the output directory."""
    try:
        return Trainer(config).train()
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
