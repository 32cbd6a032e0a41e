"""Compression recipes: `lmsmith compress RECIPE.yaml [key.path=value ...]`.

A recipe names a source model (embedded name, GGUF file, HF folder or lmsmith artifact), the data
to calibrate / train / evaluate on, and a list of steps run in order:

    name: minilm-distill
    source: minilm-l6
    task: sequence-classification        # optional: the source's own task otherwise
    data: {dataset: tweets-sentiment, sizes: {train: 4000, validation: 300, test: 1000}, max_length: 64}
    output: runs/compress-minilm-distill
    steps:
      - finetune: {baseline: true, train: {epochs: 1, lr: 1.0e-4, batch_size: 32}}
      - distill: {num_layers: 3, temperature: 2.0, train: {epochs: 2}, gate: {macro_f1: {max_drop: 0.05}}}
      - quantize: {method: int8, gate: {macro_f1: {max_drop: 0.01}, against: previous}}

Steps: finetune (the task objective through the training loop, e.g. to give a fresh classifier head
its weights), prune (unstructured / N:M masks, `prune.py`), structured (heads / neurons / layers
removed, `structured.py`), distill (student = a subset of the current model's layers, trained
through the loop's distillation objective), smooth (SmoothQuant's rescaling before W8A8,
`smooth.py`; calibrated), quantize (`quantize.py`). Every step saves an artifact
`OUTPUT/NN-step/` whose manifest history records each step's settings, result and measurements
(`report.py`) compared with the start; by default only the latest passing artifact is kept.

Quality gates: `gate: {METRIC: {max_drop | max_rise | max_ratio: X}, against: start | previous}`.
`max_drop` is in metric units (1 macro-F1 point = 0.01). The start is the source model, or the last
step marked `baseline: true`. A failing gate stops the run with `QualityGateError` (a ValueError),
deletes that step's artifact and keeps the last passing one. OUTPUT/report.md (Pareto table) and
PNG plots are written either way.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import yaml

from ..io.artifact import MANIFEST, new_manifest, read_manifest, save_artifact
from ..model.transformer import Transformer
from ..train.distributed import pick_device
from ..train.loop import TrainResult, TrainSettings, train
from .batches import (
    calibration_inputs,
    classification_batches,
    classification_features,
    classification_train_data,
    lm_batches,
    lm_blocks,
    lm_train_data,
    pad_id_of,
)
from .distill import distill, every_kth_layer, spread_layers, student_from_teacher, task_objective
from .prune import DEFAULT_EXCLUDE, prune_model, remove_masks
from .quantize import quantize_model
from .report import (
    EvalSet,
    Measurement,
    MeasureSettings,
    classifier_eval_set,
    compare,
    lm_eval_set,
    markdown_table,
    measure,
    plot_tradeoffs,
)
from .smooth import smooth_model
from .structured import structured_prune

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
TASK_KINDS = {"sequence-classification": "classifier", "causal-lm": "lm"}
TRAIN_DEFAULTS = {"progress": False, "tensorboard": False}  # recipes log to the manifest instead


class QualityGateError(ValueError):
    """A step's measurements broke its gate; `kept` is the last passing artifact (or the source)."""

    def __init__(self, message: str, kept: str, measurement: Measurement):
        super().__init__(message)
        self.kept, self.measurement = kept, measurement


# --------------------------------------------------------------------------------------------------
# Recipe data
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FinetuneStep:
    train: dict = field(default_factory=dict)  # TrainSettings fields


@dataclass(frozen=True)
class PruneStep:
    method: str = "wanda"
    sparsity: float | None = 0.5
    targets: tuple[str, ...] = ("layers.*",)  # blocks only: heads and embeddings stay dense
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    n: int = 2
    m: int = 4


@dataclass(frozen=True)
class StructuredStep:
    heads: float = 0.0  # fraction removed (of query heads per KV group, or of KV groups)
    neurons: float = 0.0  # fraction of FFN neurons removed
    layers: int | tuple[int, ...] = 0  # how many layers to drop (by calibration) or which ones
    head_unit: str = "query"
    importance: str = "magnitude"


@dataclass(frozen=True)
class DistillStep:
    keep_layers: tuple[int, ...] | None = None  # exactly one of keep_layers / num_layers / every
    num_layers: int | None = None
    every: int | None = None
    temperature: float = 2.0
    alpha: float = 0.5
    hidden_weight: float = 0.0
    train: dict = field(default_factory=dict)


@dataclass(frozen=True)
class QuantizeStep:
    method: str = "int8"
    group_size: int = 64
    symmetric: bool | None = None
    targets: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    include_lm_head: bool = False  # quantize the output head too (a tied embedding then shares it)
    lm_head_method: str | None = None  # e.g. int8 for the head of an int4 model; None: `method`
    clip_search: bool = False  # int4: search each group's range (calibration-weighted)
    gptq_act_order: bool = False  # GPTQ: most important input columns first (static groups)
    gptq_damp: float = 0.01  # GPTQ: added to the Hessian diagonal, as a fraction of its mean


@dataclass(frozen=True)
class SmoothStep:
    alpha: float = 0.5  # SmoothQuant's migration strength: 0 keeps activations as they are


STEP_SETTINGS: dict[str, type] = {"finetune": FinetuneStep, "prune": PruneStep, "structured": StructuredStep,
                                  "distill": DistillStep, "smooth": SmoothStep, "quantize": QuantizeStep}
FLOAT_ONLY_STEPS = ("finetune", "prune", "structured", "distill", "smooth")
GATE_LIMITS = ("max_drop", "max_rise", "max_ratio")
GATE_REFERENCES = ("start", "previous")


@dataclass(frozen=True)
class GateLimit:
    metric: str
    kind: str  # one of GATE_LIMITS
    value: float


@dataclass(frozen=True)
class Gate:
    limits: tuple[GateLimit, ...]
    against: str = "start"


@dataclass(frozen=True)
class Step:
    kind: str
    settings: Any  # the STEP_SETTINGS dataclass of `kind`
    gate: Gate | None = None
    baseline: bool = False  # later gates compare against this step's result


@dataclass(frozen=True)
class DataSpec:
    dataset: str | None = None  # a `lmsmith.data` dataset: labels + test split, or text for LMs
    sizes: dict | None = None  # split sizes, e.g. {train: 4000, validation: 300, test: 1000}
    seed: int = 0
    max_length: int = 128  # classifier tokens per example
    seq_len: int = 128  # LM tokens per training / calibration row
    batch_size: int = 32  # evaluation batch size
    calibration_batches: int = 8
    calibration_batch_size: int = 8
    heldout_seq_len: int = 256  # LM perplexity window


@dataclass(frozen=True)
class Recipe:
    name: str
    source: str
    output: str
    steps: tuple[Step, ...]
    task: str | None = None
    device: str = "auto"
    keep_intermediate: bool = False
    data: DataSpec = field(default_factory=DataSpec)
    measure: MeasureSettings = field(default_factory=MeasureSettings)


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------
def _tuples(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def build_dataclass(cls: type, raw: Mapping[str, Any] | None, where: str):
    """`cls(**raw)` with unknown keys named in a ValueError (lists become tuples)."""
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where} must be a mapping of settings, got {raw!r}")
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {allowed}")
    try:
        return cls(**{k: _tuples(v) for k, v in raw.items()})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None


def parse_gate(raw: Any, where: str) -> Gate | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError(f"{where}.gate must map metrics to limits, e.g. {{macro_f1: {{max_drop: 0.01}}}}")
    against = raw.get("against", "start")
    if against not in GATE_REFERENCES:
        raise ValueError(f"{where}.gate.against={against!r} is not one of {GATE_REFERENCES}")
    limits = []
    for metric, spec in raw.items():
        if metric == "against":
            continue
        if not isinstance(spec, Mapping) or not spec or set(spec) - set(GATE_LIMITS):
            raise ValueError(f"{where}.gate.{metric}: expected limits from {GATE_LIMITS}, got {spec!r}")
        limits += [GateLimit(metric, kind, float(value)) for kind, value in spec.items()]
    return Gate(tuple(limits), against)


def parse_step(raw: Any, index: int) -> Step:
    where = f"steps[{index}]"
    if not isinstance(raw, Mapping) or len(raw) != 1:
        raise ValueError(f"{where} must be one mapping {{step: settings}}, e.g. {{quantize: {{method: int8}}}}; "
                         f"got {raw!r}")
    kind, settings = next(iter(raw.items()))
    if kind not in STEP_SETTINGS:
        raise ValueError(f"{where}: unknown step {kind!r}; allowed: {sorted(STEP_SETTINGS)}")
    settings = dict(settings or {})
    gate = parse_gate(settings.pop("gate", None), f"{where}.{kind}")
    baseline = settings.pop("baseline", False)
    if not isinstance(baseline, bool):
        raise ValueError(f"{where}.{kind}.baseline must be true or false, got {baseline!r}")
    return Step(kind, build_dataclass(STEP_SETTINGS[kind], settings, f"{where}.{kind}"), gate, baseline)


def parse_recipe(raw: Mapping[str, Any]) -> Recipe:
    if not isinstance(raw, Mapping):
        raise ValueError(f"a recipe is a YAML mapping, got {type(raw).__name__}")
    raw = dict(raw)
    missing = [k for k in ("name", "source", "output", "steps") if k not in raw]
    if missing:
        raise ValueError(f"recipe is missing required key(s) {missing}")
    if not isinstance(raw["steps"], list) or not raw["steps"]:
        raise ValueError("recipe.steps must be a non-empty list of steps")
    raw["steps"] = tuple(parse_step(step, i) for i, step in enumerate(raw["steps"]))
    raw["data"] = build_dataclass(DataSpec, raw.get("data"), "data")
    raw["measure"] = build_dataclass(MeasureSettings, raw.get("measure"), "measure")
    recipe = build_dataclass(Recipe, raw, "recipe")
    _check_step_order(recipe.steps)
    if recipe.task is not None and recipe.task not in TASK_KINDS:
        raise ValueError(f"recipe.task={recipe.task!r}: compression recipes support {sorted(TASK_KINDS)}")
    return recipe


def _check_step_order(steps: Sequence[Step]) -> None:
    quantized_at = next((i for i, s in enumerate(steps) if s.kind == "quantize"), None)
    if quantized_at is None:
        return
    later = [f"steps[{i}] ({s.kind})" for i, s in enumerate(steps) if i > quantized_at and
             (s.kind in FLOAT_ONLY_STEPS or s.kind == "quantize")]
    if later:
        raise ValueError(f"{', '.join(later)} come after quantize at steps[{quantized_at}]; quantization must be "
                         "the last step (the other steps need float weights)")


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict:
    """`key.path=value` assignments (values parsed as YAML; list items by index, e.g.
    `steps.1.quantize.method=int4`) applied to a copy of the raw recipe."""
    raw = copy.deepcopy(dict(raw))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not KEY=VALUE (e.g. output=runs/x or steps.0.quantize.method=int4)")
        _set_path(raw, key.split("."), yaml.safe_load(value), item)
    return raw


def _set_path(node: Any, keys: list[str], value: Any, item: str) -> None:
    for position, key in enumerate(keys):
        last = position == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ValueError(f"override {item!r}: {key!r} is not an index of a list of {len(node)} items")
            index: Any = int(key)
        elif isinstance(node, dict):
            index = key
        else:
            raise ValueError(f"override {item!r}: cannot set {key!r} inside {node!r}")
        if last:
            node[index] = value
        else:
            if isinstance(node, dict) and node.get(index) is None:
                node[index] = {}
            node = node[index]


def resolve_recipe(name_or_path: str | Path) -> Path:
    """A recipe file path, or the name of a recipe shipped in lmsmith/recipes (with or without .yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (RECIPES_DIR / str(name_or_path), RECIPES_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = sorted(p.stem for p in RECIPES_DIR.glob("compress-*.yaml"))
    raise FileNotFoundError(f"no recipe file {str(name_or_path)!r}; shipped compress recipes: {shipped}")


def load_recipe(name_or_path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    path = resolve_recipe(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: invalid YAML ({err})") from None
    try:
        return parse_recipe(apply_overrides(raw or {}, overrides))
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


# --------------------------------------------------------------------------------------------------
# Source model
# --------------------------------------------------------------------------------------------------
def task_kind(task: str, source: str) -> str:
    """"classifier" or "lm": how a model of `task` is measured."""
    if task not in TASK_KINDS:
        raise ValueError(f"{source} is a {task!r} model; set recipe.task to one of {sorted(TASK_KINDS)}")
    return TASK_KINDS[task]


def load_source(recipe: Recipe, labels_for: Callable[[str], tuple[str, ...]]) -> tuple[Transformer, Any, str]:
    """(model, tokenizer, kind): the source with the head the recipe's task needs. An encoder without
    that head (MiniLM) gets a new seeded one, as fine-tuning does; `labels_for(kind)` names the classes."""
    from ..api import load
    from ..train.build import load_pretrained, with_new_head

    if recipe.task is not None:
        kind = task_kind(recipe.task, recipe.source)
        model, tokenizer = load_pretrained(recipe.source, recipe.task, labels_for(kind), torch.float32)
    else:  # the source's own task
        model, tokenizer = load(recipe.source)
        kind = task_kind(model.config.task, recipe.source)
        labels = labels_for(kind)
        if labels and labels != model.config.labels:
            model = with_new_head(model, model.config.task, labels, recipe.source)
    if tokenizer is None:
        raise ValueError(f"{recipe.source}: no tokenizer found with the model (needed to measure it)")
    return model, tokenizer, kind


def source_manifest(model: Transformer, source: str) -> dict:
    """An artifact's manifest continues (its history goes on); other sources start a new one."""
    manifest = copy.deepcopy(getattr(model, "manifest", None)) or new_manifest(model.config, source)
    manifest.setdefault("history", [])
    return manifest


# --------------------------------------------------------------------------------------------------
# Data for the steps (built on first use)
# --------------------------------------------------------------------------------------------------
class StepData:
    """Training data, validation batches, calibration inputs and the measurement set of a recipe."""

    def __init__(self, spec: DataSpec, tokenizer=None, kind: str = "lm"):
        self.spec, self.tokenizer, self.kind = spec, tokenizer, kind

    def labels_for(self, kind: str) -> tuple[str, ...]:
        """The dataset's class names for a classifier (loading the dataset), none for an LM."""
        self.kind = kind
        return self.labels

    @cached_property
    def dataset(self):
        from ..data import load_dataset

        if self.spec.dataset is None:
            raise ValueError("this step needs data: set data.dataset (e.g. tweets-sentiment)")
        return load_dataset(self.spec.dataset, sizes=self.spec.sizes, seed=self.spec.seed)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.dataset.labels) if self.kind == "classifier" else ()

    def _features(self, split: str) -> list[dict]:
        records = getattr(self.dataset.splits, split)
        return classification_features(records, self.tokenizer, self.labels, self.spec.max_length)

    def _blocks(self, split: str) -> torch.Tensor:
        texts = [r.text for r in getattr(self.dataset.splits, split)]
        return lm_blocks(self.tokenizer, texts, self.spec.seq_len)

    @cached_property
    def train_data(self):
        if self.kind == "classifier":
            return classification_train_data(self._features("train"), pad_id_of(self.tokenizer))
        return lm_train_data(self._blocks("train"))

    @cached_property
    def validation_batches(self) -> list[dict] | None:
        if not self.dataset.splits.validation:
            return None
        if self.kind == "classifier":
            return classification_batches(self._features("validation"), pad_id_of(self.tokenizer),
                                          self.spec.batch_size)
        return lm_batches(self._blocks("validation"), self.spec.calibration_batch_size)

    @cached_property
    def calibration(self) -> list[dict]:
        spec = self.spec
        if self.kind == "classifier":
            features = self._features("train")[: spec.calibration_batches * spec.calibration_batch_size]
            batches = classification_batches(features, pad_id_of(self.tokenizer), spec.calibration_batch_size)
        else:
            batches = lm_batches(self._blocks("train"), spec.calibration_batch_size)
        return calibration_inputs(batches, spec.calibration_batches)

    @cached_property
    def evalset(self) -> EvalSet:
        if self.kind == "classifier":
            return classifier_eval_set(self.tokenizer, self.dataset.splits.test, self.labels,
                                       self.spec.max_length, self.spec.batch_size)
        return lm_eval_set(self.tokenizer, seq_len=self.spec.heldout_seq_len)


# --------------------------------------------------------------------------------------------------
# Steps: each returns (model, JSON-able record of what was done)
# --------------------------------------------------------------------------------------------------
@dataclass
class StepRun:
    data: StepData
    scratch: Path  # the training loop's run folder for this step (removed afterwards)
    device: str


def train_settings(raw: Mapping[str, Any], where: str, device: str) -> TrainSettings:
    return build_dataclass(TrainSettings, {**TRAIN_DEFAULTS, "device": device, **raw}, f"{where}.train")


def _train_summary(result: TrainResult) -> dict[str, Any]:
    return {"steps": result.steps, "best_metric": result.best_metric, "last_eval": result.last_eval}


def run_finetune(model, s: FinetuneStep, run: StepRun):
    settings = train_settings(s.train, "finetune", run.device)
    result = train(model, task_objective(model), run.data.train_data, settings, run.scratch,
                   eval_batches=run.data.validation_batches)
    return model, {"train": _train_summary(result)}


def _calibration_for(model, run: StepRun) -> list[dict]:
    device = next(model.parameters()).device
    return [{k: v.to(device) for k, v in batch.items()} for batch in run.data.calibration]


def run_prune(model, s: PruneStep, run: StepRun):
    calibration = _calibration_for(model, run) if s.method.endswith("wanda") else None
    layers = prune_model(model, s.method, s.sparsity, targets=s.targets, exclude=s.exclude,
                         calibration=calibration, n=s.n, m=s.m)
    remove_masks(model)  # the zeros stay in the weights; masks only matter for further training
    weights = sum(math.prod(layer.shape) for layer in layers)
    zeros = sum(layer.sparsity * math.prod(layer.shape) for layer in layers)
    return model, {"pruned_layers": len(layers), "sparsity": zeros / weights}


def run_structured(model, s: StructuredStep, run: StepRun):
    needs_calibration = s.importance == "calibration" or (isinstance(s.layers, int) and s.layers > 0)
    record = structured_prune(model, heads=s.heads, neurons=s.neurons, layers=s.layers, head_unit=s.head_unit,
                              importance=s.importance,
                              calibration=_calibration_for(model, run) if needs_calibration else None)
    return model, record


def student_layers(s: DistillStep, num_layers: int) -> list[int]:
    chosen = [name for name in ("keep_layers", "num_layers", "every") if getattr(s, name) is not None]
    if len(chosen) != 1:
        raise ValueError(f"distill needs exactly one of keep_layers, num_layers, every; got {chosen or 'none'}")
    if s.keep_layers is not None:
        return list(s.keep_layers)
    if s.num_layers is not None:
        return spread_layers(num_layers, s.num_layers)
    return every_kth_layer(num_layers, s.every)


def run_distill(teacher, s: DistillStep, run: StepRun):
    keep = student_layers(s, teacher.config.num_layers)
    student = student_from_teacher(teacher, keep)
    settings = train_settings(s.train, "distill", run.device)
    result = distill(teacher, student, run.data.train_data, settings, run.scratch, temperature=s.temperature,
                     alpha=s.alpha, hidden_weight=s.hidden_weight, eval_batches=run.data.validation_batches)
    return student, {"kept_layers": keep, "num_layers": [teacher.config.num_layers, len(keep)],
                     "train": _train_summary(result)}


def run_smooth(model, s: SmoothStep, run: StepRun):
    return model, smooth_model(model, _calibration_for(model, run), alpha=s.alpha)


def run_quantize(model, s: QuantizeStep, run: StepRun):
    calibrated = s.method.startswith("gptq") or s.clip_search
    calibration = _calibration_for(model, run) if calibrated else None
    config = quantize_model(model, s.method, group_size=s.group_size, symmetric=s.symmetric, targets=s.targets,
                            exclude=s.exclude, calibration=calibration, include_lm_head=s.include_lm_head,
                            lm_head_method=s.lm_head_method, clip_search=s.clip_search,
                            gptq_act_order=s.gptq_act_order, gptq_damp=s.gptq_damp)
    return model, {"method": config.method, "bits": config.bits, "group_size": config.group_size,
                   "quantized_layers": len(config.modules),
                   "tied_embeddings": [list(pair) for pair in config.tied_embeddings],
                   "module_methods": [list(pair) for pair in config.module_methods],
                   "clip_search": config.clip_search}


STEP_RUNNERS = {"finetune": run_finetune, "prune": run_prune, "structured": run_structured,
                "distill": run_distill, "smooth": run_smooth, "quantize": run_quantize}


# --------------------------------------------------------------------------------------------------
# Gates
# --------------------------------------------------------------------------------------------------
def gate_failures(gate: Gate, measured: Measurement, start: Measurement, previous: Measurement) -> list[str]:
    """Human-readable reasons the gate fails (empty when it passes)."""
    reference = start if gate.against == "start" else previous
    failures = []
    for limit in gate.limits:
        if limit.metric not in measured.quality or limit.metric not in reference.quality:
            raise ValueError(f"gate metric {limit.metric!r} is not measured; measured: {sorted(measured.quality)}")
        value, base = measured.quality[limit.metric], reference.quality[limit.metric]
        change = {"max_drop": base - value, "max_rise": value - base,
                  "max_ratio": value / base if base else float("inf")}[limit.kind]
        if change > limit.value + 1e-12:
            failures.append(f"{limit.metric} went from {base:.4f} ({reference.name}) to {value:.4f}: "
                            f"{limit.kind.removeprefix('max_')} {change:.4f} exceeds {limit.kind} {limit.value}")
    return failures


# --------------------------------------------------------------------------------------------------
# Running a recipe
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RecipeResult:
    final: Path | None  # the last artifact written (None if there was nothing to write)
    measurements: tuple[Measurement, ...]  # the source, then one per step
    report: Path
    table: str


def run_recipe(recipe: Recipe | str | Path, overrides: Sequence[str] = (), log=print) -> RecipeResult:
    """Run every step, saving and measuring after each; raises QualityGateError when a gate fails."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise ValueError("overrides apply to recipe files; edit the Recipe object instead")
    runner = _Runner(recipe, log)
    return runner.run()


class _Runner:
    """The state of one recipe run: current model, measurements, last passing artifact."""

    def __init__(self, recipe: Recipe, log):
        self.recipe, self.log = recipe, log
        self.output = Path(recipe.output)
        self.measurements: list[Measurement] = []
        self.last_path: Path | None = None

    def run(self) -> RecipeResult:
        model = self._load()
        self.start = self.previous = self._measure_source(model)
        for index, step in enumerate(self.recipe.steps, start=1):
            model = self._run_step(model, step, index)
        return self._finish()

    def _load(self) -> Transformer:
        self.data = StepData(self.recipe.data)
        model, self.tokenizer, _ = load_source(self.recipe, self.data.labels_for)
        self.data.tokenizer = self.tokenizer
        self.manifest = source_manifest(model, self.recipe.source)
        return model.to(pick_device(self.recipe.device))

    def _measure(self, model, name: str, path: Path | None) -> Measurement:
        started = time.perf_counter()
        measured = measure(model, self.data.evalset, name, path=path, settings=self.recipe.measure)
        self.log(f"[{self.recipe.name}] measured {name} in {time.perf_counter() - started:.1f}s: {measured.quality}")
        self.measurements.append(measured)
        return measured

    def _measure_source(self, model) -> Measurement:
        measured = self._measure(model, "source", None)
        self.manifest["history"].append({"step": "source", "source": self.recipe.source,
                                         "recipe": self.recipe.name, "measured": measured.to_dict()})
        return measured

    def _run_step(self, model, step: Step, index: int):
        name = f"{index:02d}-{step.kind}"
        scratch = self.output / ".work" / name
        shutil.rmtree(scratch, ignore_errors=True)
        self.log(f"[{self.recipe.name}] step {name}: {dataclasses.asdict(step.settings)}")
        started = time.perf_counter()
        model, record = STEP_RUNNERS[step.kind](model, step.settings, StepRun(self.data, scratch, self.recipe.device))
        seconds = time.perf_counter() - started
        shutil.rmtree(scratch, ignore_errors=True)
        path = save_artifact(model, self.output / name, self.tokenizer, self.manifest)
        measured = self._measure(model, name, path)
        entry = {"step": step.kind, "name": name, "settings": dataclasses.asdict(step.settings),
                 "result": record, "seconds": round(seconds, 2), "measured": measured.to_dict(),
                 "compared_to_start": compare(measured, self.start), "start": self.start.name}
        failures = gate_failures(step.gate, measured, self.start, self.previous) if step.gate else []
        if step.gate:
            entry["gate"] = {"against": step.gate.against, "passed": not failures, "failures": failures,
                             "limits": [dataclasses.asdict(limit) for limit in step.gate.limits]}
        if failures:
            shutil.rmtree(path, ignore_errors=True)
            self._gate_failed(name, failures, measured)
        self.manifest["history"].append(entry)
        _write_manifest_history(path, self.manifest["history"])
        self._accept(path, measured, step.baseline)
        return model

    def _accept(self, path: Path, measured: Measurement, baseline: bool) -> None:
        if self.last_path is not None and not self.recipe.keep_intermediate:
            shutil.rmtree(self.last_path, ignore_errors=True)
        self.last_path, self.previous = path, measured
        if baseline:
            self.start = measured

    def _gate_failed(self, name: str, failures: list[str], measured: Measurement) -> None:
        kept = str(self.last_path) if self.last_path is not None else f"the source model {self.recipe.source}"
        self.measurements[-1] = dataclasses.replace(measured, name=f"{name} (rejected)")
        self._write_report(rejected=name)
        raise QualityGateError(f"recipe {self.recipe.name!r} stopped at step {name}: quality gate failed: "
                               f"{'; '.join(failures)}. Kept the last passing artifact: {kept}", kept, measured)

    def _finish(self) -> RecipeResult:
        report, table = self._write_report()
        shutil.rmtree(self.output / ".work", ignore_errors=True)
        return RecipeResult(self.last_path, tuple(self.measurements), report, table)

    def _write_report(self, rejected: str | None = None) -> tuple[Path, str]:
        self.output.mkdir(parents=True, exist_ok=True)
        start = getattr(self, "start", self.measurements[0])  # the source, or the last baseline step
        table = markdown_table(self.measurements, start)
        plots = plot_tradeoffs(self.measurements, self.output, title=self.recipe.name)
        lines = [f"# {self.recipe.name}", "", f"Source: `{self.recipe.source}`. Ratios are against {start.name}.",
                 "", table, ""]
        if rejected:
            lines += [f"**Stopped**: step {rejected} failed its quality gate (its artifact was deleted).", ""]
        lines += [f"![{p.stem}]({p.name})" for p in plots]
        report = self.output / "report.md"
        report.write_text("\n".join(lines) + "\n")
        (self.output / "report.json").write_text(json.dumps([m.to_dict() for m in self.measurements], indent=2))
        return report, table


def _write_manifest_history(path: Path, history: list[dict]) -> None:
    """Add the step's measurements to the manifest the artifact was saved with."""
    manifest = read_manifest(path)
    manifest["history"] = history
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
