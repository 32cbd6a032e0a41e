"""`pretrain` and `finetune`: a recipe in, a trained model folder (or PEFT adapter folder) out.

    from lmsmith.train.api import finetune
    result = finetune("minilm-sentiment-lora", ["train.max_steps=20"], output__dir="runs/lora")
    result.test["macro_f1"], result.adapter_dir

The run folder (`output.dir`) keeps config.yaml (the resolved recipe), metrics.jsonl, tensorboard/,
checkpoints/, best/, results.json and the outputs: `model/` (an lmsmith artifact that `lmsmith.api.load`
and `transformers` both load) or, with PEFT, `adapter/` (peft's folder format) plus `merged/` when
`peft.save_merged` is set.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import distributed as D
from .build import (
    CLASSIFICATION,
    LM_OBJECTIVES,
    build_model,
    build_objective,
    build_tokenizer,
    load_splits,
    prepare_data,
    scratch_config,
    texts_of,
)
from .loop import TrainResult, evaluate, planned_steps, to_device, train
from .objectives import MODEL_TASKS, Distillation
from .recipes import RunConfig, load_recipe, peft_config, to_dict, to_yaml
from .state import seed_everything

log = logging.getLogger(__name__)
PEFT_TASK_TYPES = {"causal-lm": "CAUSAL_LM", "chat-sft": "CAUSAL_LM", "sequence-classification": "SEQ_CLS",
                   "token-classification": "TOKEN_CLS", "masked-lm": None, "seq2seq-lm": "SEQ_2_SEQ_LM"}
LINEAR_METHODS = ("lora", "dora", "ia3", "adalora")


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    model_dir: Path | None  # full model (artifact), or the merged PEFT model
    adapter_dir: Path | None
    validation: dict[str, float]
    test: dict[str, float]
    steps: int
    stopped_early: bool
    resumed_from: int | None
    train_seconds: float
    model: nn.Module | None = field(default=None, repr=False, compare=False)  # the trained model, in memory
    tokenizer: Any = field(default=None, repr=False, compare=False)


def finetune(recipe: str | os.PathLike | Mapping | RunConfig, overrides: Sequence[str] | Mapping = (), *,
             resume: bool = False, **keyword_overrides: Any) -> RunResult:
    """Fine-tune as the recipe says. Overrides: ["train.lr=1e-4"] and/or keywords (train__lr=1e-4)."""
    return run(recipe, overrides, resume=resume, verb="finetune", **keyword_overrides)


def pretrain(recipe: str | os.PathLike | Mapping | RunConfig, overrides: Sequence[str] | Mapping = (), *,
             resume: bool = False, **keyword_overrides: Any) -> RunResult:
    """Pretrain (from a preset) or continue pretraining (from a source) with a causal- or masked-LM objective."""
    return run(recipe, overrides, resume=resume, verb="pretrain", **keyword_overrides)


def resolve_config(recipe, overrides: Sequence[str] | Mapping = (), **keyword_overrides: Any) -> RunConfig:
    from .recipes import parse_overrides

    merged = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(list(overrides))
    merged.update(keyword_overrides)
    return load_recipe(recipe, merged)


def run(recipe, overrides: Sequence[str] | Mapping = (), *, resume: bool = False, verb: str = "finetune",
        **keyword_overrides: Any) -> RunResult:
    cfg = resolve_config(recipe, overrides, **keyword_overrides)
    if verb == "pretrain" and cfg.objective not in LM_OBJECTIVES:
        raise ValueError(f"pretrain needs objective causal-lm or masked-lm, the recipe says {cfg.objective!r}; "
                         "use finetune")
    already = D.dist.is_available() and D.dist.is_initialized()
    ctx = D.setup(cfg.train.device, cfg.distributed.backend)
    try:
        return run_config(cfg, ctx, resume, verb)
    finally:
        if not already:
            D.teardown()


def run_config(cfg: RunConfig, ctx: D.DistContext, resume: bool, verb: str) -> RunResult:
    run_dir = Path(cfg.output.dir)
    seed_everything(cfg.train.seed)
    splits, labels = load_splits(cfg.data, cfg.objective)
    model, tokenizer = build_model(cfg, labels)
    tokenizer = build_tokenizer(cfg, tokenizer, texts_of(splits.train))
    if model is None:
        from ..model.transformer import Transformer

        seed_everything(cfg.train.seed)
        model = Transformer(scratch_config(cfg.model, tokenizer, MODEL_TASKS[cfg.objective], labels))
    data = prepare_data(cfg, tokenizer, splits, labels)
    objective = build_objective(cfg, labels)
    if isinstance(objective, Distillation):
        objective.teacher[0].to(ctx.device)
    callbacks = add_peft(model, cfg, len(data.train.dataset), ctx)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    log.info("%s %s: data %s, %d parameters (%d trainable)", verb, cfg.name or cfg.objective, data.sizes,
             model.num_parameters(), model.num_parameters(trainable_only=True))
    start = time.perf_counter()
    result = train(model, objective, data.train, cfg.train, run_dir, eval_batches=data.validation,
                   callbacks=callbacks, resume=resume, ctx=ctx, strategy=cfg.distributed.strategy)
    seconds = time.perf_counter() - start
    test = evaluate(model, objective, data.test, cfg.train.precision, ctx.device) if data.test else {}
    probe = next(iter(data.validation or data.test or ()), None)  # for the QLoRA merge report
    model_dir, adapter_dir = export(model, tokenizer, cfg, run_dir, result, test, ctx, verb, probe)
    outcome = RunResult(run_dir, model_dir, adapter_dir, result.last_eval, test, result.steps,
                        result.stopped_early, result.resumed_from, seconds, D.unwrap(model), tokenizer)
    if ctx.is_main:
        write_results(run_dir, outcome, result, data.sizes)
    return outcome


def add_peft(model: nn.Module, cfg: RunConfig, train_examples: int, ctx: D.DistContext) -> list:
    """Apply the recipe's PEFT method; returns the callbacks the loop must run (AdaLoRA's allocator)."""
    from .peft import apply_peft, peft_callbacks

    if cfg.peft.method is None:
        return []
    if cfg.distributed.strategy == "fsdp" and ctx.enabled:
        raise ValueError("PEFT with distributed.strategy=fsdp is not supported; use ddp (adapters are small)")
    per_epoch = -(-train_examples // (cfg.train.batch_size * ctx.world_size))
    section = cfg.peft
    if cfg.objective in CLASSIFICATION and "modules_to_save" not in section.params:
        # a new classification head must train, or the adapters learn against a random projection
        section = type(section)(section.method, {**section.params, "modules_to_save": ["classifier.pooler", "classifier.out"]},
                                section.save_merged)
    seed_everything(cfg.train.seed + 1)
    apply_peft(model, peft_config(section, planned_steps(cfg.train, per_epoch)))
    return peft_callbacks(model)


# --- outputs ------------------------------------------------------------------------------------------------

def manifest_for(model, cfg: RunConfig, verb: str, result: TrainResult, test: dict) -> dict:
    from ..io.artifact import new_manifest

    manifest = new_manifest(model.config, cfg.model.source or f"preset:{cfg.model.preset}")
    manifest["history"].append({"op": verb, "recipe": to_dict(cfg), "steps": result.steps,
                                "validation": result.last_eval, "test": test})
    return manifest


def export(model: nn.Module, tokenizer, cfg: RunConfig, run_dir: Path, result: TrainResult, test: dict,
           ctx: D.DistContext, verb: str, probe: dict | None = None) -> tuple[Path | None, Path | None]:
    """Write model/ (full training) or adapter/ [+ merged/] (PEFT). Rank 0 writes; all ranks return paths."""
    model = full_model(D.unwrap(model), ctx)
    model_dir = adapter_dir = None
    if cfg.peft.method is None:
        model_dir = run_dir / "model"
        if ctx.is_main:
            save_model(model, tokenizer, model_dir, manifest_for(model, cfg, verb, result, test))
    else:
        adapter_dir = run_dir / "adapter"
        if ctx.is_main:
            save_peft_adapter(model, tokenizer, adapter_dir, cfg)
        if cfg.peft.save_merged and cfg.peft.method in LINEAR_METHODS:
            model_dir = run_dir / "merged"
            if ctx.is_main:
                save_merged(model, tokenizer, model_dir, manifest_for(model, cfg, verb, result, test), probe)
        elif cfg.peft.save_merged:
            log.warning("peft.save_merged: %s adapters are not linear and cannot be merged", cfg.peft.method)
    D.barrier()
    return model_dir, adapter_dir


def full_model(model: nn.Module, ctx: D.DistContext) -> nn.Module:
    """An unsharded CPU copy when FSDP sharded the parameters; the model itself otherwise."""
    if not D.is_sharded(model):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ..model.transformer import Transformer

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    copy_ = Transformer(model.config)
    if ctx.is_main:
        copy_.load_state_dict(state)
    return copy_


def save_model(model, tokenizer, folder: Path, manifest: dict) -> Path:
    from ..io.artifact import save_artifact

    return save_artifact(model.eval(), folder, tokenizer, manifest)


def save_peft_adapter(model, tokenizer, folder: Path, cfg: RunConfig) -> Path:
    from ..api import resolve
    from ..io.weights import module_name_map
    from .peft import save_adapter

    names = module_name_map(model.config)
    source = str(resolve(cfg.model.source)) if cfg.model.source else None
    save_adapter(model, folder, name_map=lambda name: names.get(name, name), base_model_name_or_path=source,
                 task_type=PEFT_TASK_TYPES[cfg.objective])
    if tokenizer is not None:
        tokenizer.save(folder)
    return folder


def save_merged(model, tokenizer, folder: Path, manifest: dict, probe: dict | None = None) -> Path:
    """The adapters merged into the base and saved. Over a quantized base (QLoRA) the merge
    dequantizes, adds and requantizes: the logit difference that costs, on `probe` (a batch),
    goes into the manifest's last history entry as "merge"."""
    from .peft import merge_peft, unload_peft

    merged = copy.deepcopy(model).eval()
    if probe is not None and has_quantized_adapters(merged):
        from .objectives import forward

        probe = to_device(probe, next(merged.buffers()).device)
        with torch.no_grad():
            unquantized_merge = forward(merged, probe).logits.float()  # float adapter on the dequantized base
            merge_peft(merged)
            requantized = forward(merged, probe).logits.float()
        report = logit_difference(unquantized_merge, requantized)
        manifest["history"][-1]["merge"] = {"into": "quantized base (dequantize, merge, requantize)", **report}
        log.info("merged into the quantized base: logits vs the unquantized merge %s", report)
    return save_model(unload_peft(merged, merge=True), tokenizer, folder, manifest)


def has_quantized_adapters(model: nn.Module) -> bool:
    from .peft.base import AdaptedLinear

    return any(isinstance(m, AdaptedLinear) and m.quantized for m in model.modules())


def logit_difference(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """How far `other` logits are from `reference`: max/mean absolute, relative (Frobenius) and the
    fraction of positions whose top-1 prediction agrees."""
    diff = (other - reference).abs()
    return {"max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
            "relative_logit_diff": float((other - reference).norm() / reference.norm().clamp(min=1e-12)),
            "top1_agreement": float((other.argmax(-1) == reference.argmax(-1)).float().mean())}


def write_results(run_dir: Path, outcome: RunResult, result: TrainResult, sizes: dict) -> None:
    record = {"steps": outcome.steps, "stopped_early": outcome.stopped_early, "best_step": result.best_step,
              "best_metric": result.best_metric, "skipped_steps": result.skipped_steps,
              "resumed_from": outcome.resumed_from, "train_seconds": round(outcome.train_seconds, 2),
              "data_sizes": sizes, "validation": outcome.validation, "test": outcome.test,
              "model_dir": str(outcome.model_dir) if outcome.model_dir else None,
              "adapter_dir": str(outcome.adapter_dir) if outcome.adapter_dir else None}
    (run_dir / "results.json").write_text(json.dumps(record, indent=2))
