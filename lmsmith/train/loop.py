"""The one explicit training loop: every objective, every PEFT method, one process or many.

    result = train(model, objective, TrainData(dataset, collate), TrainSettings(lr=3e-4, max_steps=100),
                   run_dir="runs/x", eval_batches=validation_batches)

One optimizer step is: take `grad_accum` micro-batches, weight each by its share of the step's
targets (summed over data-parallel ranks too, so N ranks × b examples equals one process × N·b),
forward under autocast, backward, clip, AdamW step, PEFT callbacks (AdaLoRA's rank allocation),
schedule step. Around it: logging (progress bar, metrics.jsonl, TensorBoard), evaluation every
`eval_every` steps with early stopping and keep-best, and atomic checkpoints from which `resume`
continues exactly: parameters, optimizer, schedule, RNG states and data position are all restored.
A non-finite loss or gradient stops the run (or skips the step with `skip_nonfinite`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..data.sampler import ResumableSampler
from ..io.checkpoint import replace_dir
from ..robustness.adversarial import AdversarialSettings
from . import distributed as D
from . import state as S
from .objectives import Batch, Objective

log = logging.getLogger(__name__)
SCHEDULES = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
LOWER_IS_BETTER = ("loss", "perplexity")
BEST_DIR = "best"
METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class TrainSettings:
    seed: int = 0
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 8  # per process and micro-batch
    eval_batch_size: int | None = None  # default: batch_size
    grad_accum: int = 1
    lr: float = 5e-5
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    min_lr_ratio: float = 0.0  # the schedule decays to lr · min_lr_ratio
    max_grad_norm: float | None = 1.0
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU (bf16 matmuls are slow there)
    activation_checkpointing: bool = False
    eval_every: int | None = None  # steps; None: evaluate once, at the end
    save_every: int | None = None  # steps; None: no intermediate checkpoints
    log_every: int = 10
    patience: int | None = None  # evaluations without improvement before stopping early
    metric: str = "loss"  # validation metric for keep-best and early stopping
    keep_best: bool = True
    keep_checkpoints: int = 2
    skip_nonfinite: bool = False
    progress: bool = True
    tensorboard: bool = True
    device: str = "auto"
    # adversarial training on the token embeddings, e.g. {method: fgm, epsilon: 1.0}; None = plain training
    adversarial: AdversarialSettings | None = None

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train.schedule={self.schedule!r} is not one of {SCHEDULES}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision={self.precision!r} is not one of {PRECISIONS}")
        for name in ("batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_every", "save_every", "patience", "eval_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"train.{name} must be >= 1 or null, got {value}")
        if self.epochs <= 0 and self.max_steps is None:
            raise ValueError(f"train.epochs must be > 0 (or set max_steps), got {self.epochs}")
        if self.lr <= 0 or not 0 <= self.warmup_ratio < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"need lr > 0, 0 <= warmup_ratio < 1, 0 <= min_lr_ratio <= 1; got lr={self.lr}, "
                             f"warmup_ratio={self.warmup_ratio}, min_lr_ratio={self.min_lr_ratio}")
        if self.patience is not None and self.eval_every is None:
            raise ValueError("train.patience (early stopping) needs train.eval_every")

    @property
    def greater_is_better(self) -> bool:
        return self.metric.rsplit("/", 1)[-1] not in LOWER_IS_BETTER


@dataclass(frozen=True)
class TrainData:
    """The training examples and how to batch them (a collate function; it may keep RNG state, as
    MLMCollator does, through `state_dict`/`load_state_dict`)."""

    dataset: Dataset
    collate: Callable[[list], Batch]


@dataclass
class LoopState:
    """Counters saved with every checkpoint."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # input tokens seen (all ranks)
    best: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    skipped_steps: int = 0


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    steps: int
    stopped_early: bool
    best_metric: float | None
    best_step: int | None
    last_eval: dict[str, float]
    skipped_steps: int
    resumed_from: int | None


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the run stopped before updating any weight."""


# --- pure pieces ----------------------------------------------------------------------------------------

def lr_multiplier(step: int, *, total: int, warmup: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Learning-rate factor for optimizer step `step` (0-based): linear warmup from 0, then linear or
    cosine decay to `min_ratio` at `total` (transformers' schedules when min_ratio is 0)."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * decay


def warmup_steps(settings: TrainSettings, total: int) -> int:
    return settings.warmup_steps or math.ceil(settings.warmup_ratio * total)


def planned_steps(settings: TrainSettings, batches_per_epoch: int) -> int:
    if settings.max_steps is not None:
        return settings.max_steps
    return max(1, math.ceil(settings.epochs * batches_per_epoch / settings.grad_accum))


def no_decay(module: nn.Module, param_name: str, param: torch.Tensor) -> bool:
    """Biases, norm weights, embeddings and other vectors are not weight-decayed."""
    is_norm = isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or "norm" in type(module).__name__.lower()
    return param_name == "bias" or param.ndim < 2 or is_norm or isinstance(module, nn.Embedding)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay for weight matrices, none for biases/norms/embeddings. Frozen params left out;
    a parameter shared by two modules (tied embeddings) is listed once, without decay if either says so."""
    owners: dict[int, tuple[nn.Parameter, bool]] = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                exempt = no_decay(module, name, p) or owners.get(id(p), (p, False))[1]
                owners[id(p)] = (p, exempt)
    decay = [p for p, exempt in owners.values() if not exempt]
    rest = [p for p, exempt in owners.values() if exempt]
    if not decay and not rest:
        raise ValueError("the model has no trainable parameters")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.AdamW:
    groups = parameter_groups(model, settings.weight_decay)
    params = [p for group in groups for p in group["params"]]
    # The fused kernel is ~3x faster than the per-tensor loop on CPU too (same state, resumable).
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point and type(p) is nn.Parameter
                for p in params)
    return torch.optim.AdamW(groups, lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps, fused=fused)


def autocast_for(precision: str, device: torch.device):
    """bf16 autocast on CUDA for "auto"; CPU stays fp32 unless bf16 is asked for explicitly."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda"
                                       and torch.cuda.is_bf16_supported())
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def count_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def epochs_done(sampler: ResumableSampler) -> float:
    """Epochs completed, fractional: epoch index plus the share of its batches already drawn."""
    return sampler.epoch + sampler.position / max(sampler.batches_per_epoch, 1)


def improved(value: float, best: float | None, greater_is_better: bool) -> bool:
    if best is None:
        return True
    return value > best if greater_is_better else value < best


# --- logging ----------------------------------------------------------------------------------------------

class MetricsLog:
    """metrics.jsonl (one JSON object per line) and TensorBoard scalars, written by rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled, self.path, self.writer = enabled, run_dir / METRICS_FILE, None
        if not enabled:
            return
        if resume_step is not None:
            keep_until(self.path, resume_step)  # drop lines the killed run wrote after its checkpoint
        elif self.path.exists():
            self.path.unlink()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)

    def write(self, split: str, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"split": split, "step": step, **values}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def keep_until(path: Path, step: int) -> None:
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


def read_metrics(run_dir: str | Path, split: str = "train") -> list[dict]:
    """The records of one split from a run's metrics.jsonl, in order."""
    path = Path(run_dir) / METRICS_FILE
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("split") == split]


def progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


# --- checkpoints ------------------------------------------------------------------------------------------

@dataclass
class Checkpointable:
    """Everything a checkpoint captures, gathered so save and restore read as one list."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: D.ShardedBatchSampler
    collate: Callable
    callbacks: Sequence[Any]
    run_dir: Path
    loop: LoopState = field(default_factory=LoopState)

    def trainer_state(self) -> dict:
        return {
            "loop": asdict(self.loop),
            "optimizer": D.optimizer_state(self.model, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "collate": _state_of(self.collate),
            "callbacks": [_state_of(cb) for cb in self.callbacks],
        }

    def load_trainer_state(self, state: Mapping) -> None:
        self.loop = LoopState(**state["loop"])
        D.load_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        _load_state(self.collate, state["collate"])
        for callback, saved in zip(self.callbacks, state["callbacks"]):
            _load_state(callback, saved)


def _state_of(obj) -> Any:
    return obj.state_dict() if hasattr(obj, "state_dict") else None


def _load_state(obj, saved) -> None:
    if saved is not None and hasattr(obj, "load_state_dict"):
        obj.load_state_dict(saved)


def save_checkpoint(run_dir: Path, parts: Checkpointable, ctx: D.DistContext, keep: int) -> Path:
    """Write checkpoints/step-N atomically: rank 0 writes weights and trainer state, each rank its RNG."""
    target = S.step_dir(run_dir, parts.loop.step)
    weights, trainer = D.trainable_state(parts.model), parts.trainer_state()  # collective under FSDP
    tmp = D.broadcast_object(str(S.new_temp_dir(target)) if ctx.is_main else None)
    tmp = Path(tmp)
    S.write_tree(S.capture_rng(), tmp / f"rng-rank{ctx.rank}.json", tmp / f"rng-rank{ctx.rank}.safetensors")
    if ctx.is_main:
        S.save_tensors(weights, tmp / S.MODEL_FILE)
        S.write_tree(trainer, tmp / S.STATE_FILE, tmp / S.TENSORS_FILE)  # state.json last: marks completion
    D.barrier()
    if ctx.is_main:
        replace_dir(tmp, target)
        S.prune_checkpoints(run_dir, keep)
    D.barrier()
    return target


def restore_checkpoint(folder: Path, parts: Checkpointable, ctx: D.DistContext) -> None:
    D.load_trainable_state(parts.model, S.load_tensors(folder / S.MODEL_FILE))
    parts.load_trainer_state(S.read_tree(folder / S.STATE_FILE, folder / S.TENSORS_FILE))
    rng = folder / f"rng-rank{ctx.rank}.json"
    if not rng.exists():
        raise ValueError(f"{folder} has no RNG state for rank {ctx.rank}: resume with the world size it was "
                         "saved with")
    S.restore_rng(S.read_tree(rng, rng.with_suffix(".safetensors")))


def save_best(run_dir: Path, model: nn.Module, ctx: D.DistContext, record: Mapping[str, float]) -> None:
    weights = D.trainable_state(model)
    if ctx.is_main:
        tmp = S.new_temp_dir(run_dir / BEST_DIR)
        S.save_tensors(weights, tmp / S.MODEL_FILE)
        (tmp / "metrics.json").write_text(json.dumps(record, indent=2))
        replace_dir(tmp, run_dir / BEST_DIR)
    D.barrier()


def load_best(run_dir: Path, model: nn.Module) -> None:
    D.load_trainable_state(model, S.load_tensors(run_dir / BEST_DIR / S.MODEL_FILE))


# --- evaluation -------------------------------------------------------------------------------------------

def evaluate(model: nn.Module, objective: Objective, batches: Sequence[Batch], precision: str = "fp32",
             device: torch.device | None = None) -> dict[str, float]:
    """The objective's validation metrics, in eval mode (no dropout); training mode is restored."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast_for(precision, device):
            return objective.evaluate(model, (to_device(b, device) for b in batches))
    finally:
        model.train(was_training)


# --- the loop ---------------------------------------------------------------------------------------------

def endless(sampler: D.ShardedBatchSampler, data: TrainData) -> Iterator[Batch]:
    """Micro-batches across epochs; the sampler moves to the next epoch (new order) at each end."""
    while True:
        for indices in sampler:
            yield data.collate([data.dataset[i] for i in indices])


def train(model: nn.Module, objective: Objective, data: TrainData, settings: TrainSettings,
          run_dir: str | Path, *, eval_batches: Sequence[Batch] | None = None,
          callbacks: Sequence[Any] = (), resume: bool = False, ctx: D.DistContext | None = None,
          strategy: str = "ddp") -> TrainResult:
    """Train `model` in place; see the module docstring. Returns counters and the last validation metrics."""
    ctx = ctx or D.setup(settings.device)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model.to(ctx.device).train()
    model.activation_checkpointing = settings.activation_checkpointing
    sampler = D.ShardedBatchSampler(
        ResumableSampler(len(data.dataset), settings.batch_size * ctx.world_size, seed=settings.seed,
                         drop_last=ctx.enabled),
        ctx.rank, ctx.world_size)
    total = planned_steps(settings, sampler.sampler.batches_per_epoch)
    wrapped = D.wrap(model, ctx, strategy)
    optimizer = build_optimizer(model, settings)
    schedule = partial(lr_multiplier, total=total, warmup=warmup_steps(settings, total),
                       schedule=settings.schedule, min_ratio=settings.min_lr_ratio)
    parts = Checkpointable(wrapped, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
                           sampler, data.collate, callbacks, run_dir)
    resumed_from = _maybe_resume(run_dir, parts, ctx, resume)
    logger = MetricsLog(run_dir, ctx.is_main, settings.tensorboard, resumed_from)
    try:
        stopped_early, last_eval = _run(wrapped, objective, data, settings, run_dir, parts, ctx, total,
                                        eval_batches, logger)
    finally:
        logger.close()
    if settings.keep_best and eval_batches and (run_dir / BEST_DIR / S.MODEL_FILE).exists():
        load_best(run_dir, wrapped)
    loop = parts.loop
    return TrainResult(run_dir, loop.step, stopped_early, loop.best, loop.best_step, last_eval,
                       loop.skipped_steps, resumed_from)


def _maybe_resume(run_dir: Path, parts: Checkpointable, ctx: D.DistContext, resume: bool) -> int | None:
    folder = S.latest_checkpoint(run_dir)
    if not resume:
        if folder is not None:
            raise ValueError(f"{run_dir} already holds checkpoints ({folder.name}); resume the run or choose "
                             "another output folder")
        return None
    if folder is None:
        log.warning("resume: no checkpoint in %s, starting from the beginning", run_dir)
        return None
    restore_checkpoint(folder, parts, ctx)
    log.info("resumed from %s (step %d)", folder, parts.loop.step)
    return parts.loop.step


def _run(model, objective, data, settings, run_dir, parts, ctx, total, eval_batches, logger):
    stream = endless(parts.sampler, data)
    bar = progress_bar(total, parts.loop.step, ctx.is_main and settings.progress)
    last_eval: dict[str, float] = {}
    window = _Window(time.perf_counter(), parts.loop.tokens)
    with bar:
        while parts.loop.step < total:
            micro = [to_device(next(stream), ctx.device) for _ in range(settings.grad_accum)]
            outcome = _optimizer_step(model, objective, micro, settings, parts, ctx)
            parts.loop.step += 1
            step = parts.loop.step
            if step % settings.log_every == 0 or step == total:
                record = window.record(outcome, parts, ctx)
                logger.write("train", step, record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            if eval_batches and settings.eval_every and step % settings.eval_every == 0:
                last_eval = _evaluate_and_track(model, objective, eval_batches, settings, run_dir, parts, ctx, logger)
                if _patience_exhausted(settings, parts.loop):
                    _save_if_due(run_dir, parts, ctx, settings, force=True)
                    return True, last_eval
            _save_if_due(run_dir, parts, ctx, settings)
    if eval_batches and (not last_eval or parts.loop.step % (settings.eval_every or total + 1) != 0):
        last_eval = _evaluate_and_track(model, objective, eval_batches, settings, run_dir, parts, ctx, logger)
    return False, last_eval


def _save_if_due(run_dir, parts, ctx, settings, force: bool = False) -> None:
    if settings.save_every and (force or parts.loop.step % settings.save_every == 0):
        save_checkpoint(run_dir, parts, ctx, settings.keep_checkpoints)


def _patience_exhausted(settings: TrainSettings, loop: LoopState) -> bool:
    return settings.patience is not None and loop.evals_without_improvement >= settings.patience


@dataclass
class _StepOutcome:
    loss_sum: torch.Tensor  # Σ target-weighted loss over this rank's micro-batches
    targets: int  # targets over all ranks
    grad_norm: float | None
    skipped: bool


class _Window:
    """Tokens/s between log lines."""

    def __init__(self, start: float, tokens: int):
        self.time, self.tokens = start, tokens

    def record(self, outcome: _StepOutcome, parts: Checkpointable, ctx: D.DistContext) -> dict[str, float]:
        loss_sum = D.all_reduce_sum(outcome.loss_sum.detach().reshape(1))
        now = time.perf_counter()
        rate = (parts.loop.tokens - self.tokens) / max(now - self.time, 1e-9)
        self.time, self.tokens = now, parts.loop.tokens
        record = {"loss": float(loss_sum) / max(outcome.targets, 1), "lr": parts.scheduler.get_last_lr()[0],
                  "epoch": epochs_done(parts.sampler.sampler), "tokens": parts.loop.tokens, "tokens_per_s": rate}
        if outcome.grad_norm is not None:
            record["grad_norm"] = outcome.grad_norm
        if outcome.skipped:
            record["skipped"] = True
        return record


def _optimizer_step(model, objective, micro: list[Batch], settings, parts, ctx) -> _StepOutcome:
    counts = [objective.num_targets(b) for b in micro]
    total_targets = int(D.all_reduce_sum(torch.tensor([sum(counts)], device=ctx.device)).item())
    loss_sum = torch.zeros((), device=ctx.device)
    nonfinite = None
    for index, (batch, count) in enumerate(zip(micro, counts)):
        last = index == len(micro) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast_for(settings.precision, ctx.device):
                loss, _ = objective(model, batch)
                extra = _callback_loss(parts.callbacks, D.unwrap(model)) if last else None
            if D.any_rank(not torch.isfinite(loss.detach()).item(), ctx.device):
                nonfinite = float(loss.detach())
                break
            # DDP averages gradients over ranks; scaling by world/total makes that a mean over all targets.
            weighted = loss * (count * ctx.world_size / max(total_targets, 1))
            (weighted + extra if extra is not None else weighted).backward()
            loss_sum += loss.detach() * count
    parts.loop.tokens += sum(count_tokens(b) for b in micro) * ctx.world_size
    grad_norm = None if nonfinite is not None else _clip(model, settings)
    if nonfinite is not None or (grad_norm is not None and not math.isfinite(grad_norm)):
        _handle_nonfinite(settings, parts, nonfinite, grad_norm)
        return _StepOutcome(loss_sum, total_targets, grad_norm, skipped=True)
    parts.optimizer.step()
    for callback in parts.callbacks:
        callback.on_step_end(parts.loop.step, D.unwrap(model))  # gradients are still there
    parts.optimizer.zero_grad(set_to_none=True)
    parts.scheduler.step()
    return _StepOutcome(loss_sum, total_targets, grad_norm, skipped=False)


def _callback_loss(callbacks: Sequence[Any], model: nn.Module) -> torch.Tensor | None:
    terms = [t for cb in callbacks if hasattr(cb, "extra_loss") and (t := cb.extra_loss(model)) is not None]
    return sum(terms) if terms else None


def _clip(model: nn.Module, settings: TrainSettings) -> float | None:
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return None
    limit = settings.max_grad_norm if settings.max_grad_norm is not None else math.inf
    norm = torch.nn.utils.clip_grad_norm_(params, limit)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _handle_nonfinite(settings: TrainSettings, parts: Checkpointable, loss: float | None,
                      grad_norm: float | None) -> None:
    parts.optimizer.zero_grad(set_to_none=True)
    step = parts.loop.step + 1
    what = f"loss is {loss}" if loss is not None else f"gradient norm is {grad_norm}"
    if not settings.skip_nonfinite:
        latest = S.latest_checkpoint(parts.run_dir)
        last = f"last good checkpoint: {latest}" if latest else "no checkpoint was saved yet"
        raise NonFiniteLossError(
            f"step {step}: {what}; stopped without updating the weights ({last}). Lower the learning rate, "
            "check the data, or set train.skip_nonfinite=true to skip such batches")
    log.warning("step %d: %s; batch skipped (skip_nonfinite)", step, what)
    parts.loop.skipped_steps += 1
    parts.scheduler.step()


def _evaluate_and_track(model, objective, batches, settings, run_dir, parts, ctx, logger) -> dict[str, float]:
    metrics = evaluate(model, objective, batches, settings.precision, ctx.device)
    if settings.metric not in metrics:
        raise ValueError(f"train.metric={settings.metric!r} is not a validation metric of {objective.name}; "
                         f"available: {sorted(metrics)}")
    value, loop = metrics[settings.metric], parts.loop
    if improved(value, loop.best, settings.greater_is_better):
        loop.best, loop.best_step, loop.evals_without_improvement = value, loop.step, 0
        if settings.keep_best:
            save_best(run_dir, model, ctx, {"step": loop.step, **metrics})
    else:
        loop.evals_without_improvement += 1
    logger.write("validation", loop.step, metrics)
    return metrics
