"""From a RunConfig to the pieces the loop needs: tokenizer, model, encoded data, objective.

Each function takes the frozen config (or one of its sections) and returns plain objects, so the
same recipe always builds the same model and the same batches (all randomness is seeded).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

from .. import data as D
from ..evaluate.batches import pad_id_of
from ..model.config import PRESETS, ModelConfig
from ..model.transformer import Transformer
from ..tokenizer import SpecialTokens, Tokenizer
from .loop import TrainData
from .objectives import MODEL_TASKS, Batch, Distillation, Objective, objective_for
from .recipes import DataSection, ModelSection, RunConfig, TokenizerSection

log = logging.getLogger(__name__)
LM_OBJECTIVES = ("causal-lm", "masked-lm")
CLASSIFICATION = ("sequence-classification", "token-classification")


@dataclass(frozen=True)
class PreparedData:
    train: TrainData
    validation: list[Batch]
    test: list[Batch]
    labels: tuple[str, ...]
    sizes: dict[str, int]  # examples (or packed blocks) per split


# --- records --------------------------------------------------------------------------------------------

def load_splits(section: DataSection, objective: str) -> tuple[D.Splits, tuple[str, ...]]:
    """Train/validation/test records and the class labels (empty for language modelling)."""
    split_options = {"ratios": section.ratios, "sizes": dict(section.sizes) if section.sizes else None,
                     "seed": section.seed}
    if section.source in D.dataset_names():
        loaded = D.load_dataset(section.source, stratify=section.stratify, **split_options)
        return augmented(loaded.splits, section), tuple(section.labels or loaded.labels)
    records = read_records(section, objective)
    labelled = objective in CLASSIFICATION and objective != "token-classification"
    splits = D.split(records, stratify=section.stratify and labelled, **split_options)
    return augmented(splits, section), tuple(section.labels) or infer_labels(splits.train, objective)


def augmented(splits: D.Splits, section: DataSection) -> D.Splits:
    """The splits with `data.augment`'s perturbed copies added to train (validation/test untouched)."""
    if section.augment is None:
        return splits
    from ..robustness.augmentation import augment_train_split

    splits, counts = augment_train_split(splits, section.augment)
    log.info("data.augment: %s", counts.describe())
    return splits


def data_format(section: DataSection) -> str:
    if section.format != "auto":
        return section.format
    path = Path(section.source)
    if path.is_dir() or path.suffix == ".txt":
        return "text"
    known = {".csv": "csv", ".jsonl": "jsonl", ".conll": "conll"}
    if path.suffix not in known:
        raise ValueError(f"cannot tell the format of {path}; set data.format to one of text, csv, jsonl, conll")
    return known[path.suffix]


def read_records(section: DataSection, objective: str) -> list:
    path = Path(section.source)
    if not path.exists():
        raise FileNotFoundError(f"data.source {section.source!r} is neither a registered data set "
                                f"({D.dataset_names()}) nor an existing file or folder")
    fmt = data_format(section)
    if objective == "chat-sft":
        return read_chat_jsonl(path)
    if fmt == "conll":
        return D.read_conll(path)
    if fmt == "text":
        records = D.read_text(path, unit=section.text_unit, pattern=section.pattern)
    else:
        columns = dict(section.columns) or default_columns(objective)
        if objective == "seq2seq-lm" and "target" not in columns:
            raise ValueError(f"objective 'seq2seq-lm' needs a target column: data.columns={columns} has no "
                             "'target' (e.g. data.columns: {text: source, target: summary})")
        reader = D.read_csv if fmt == "csv" else D.read_jsonl
        records = reader(path, columns)
    return D.clean(records)[0]


def default_columns(objective: str) -> dict[str, str]:
    """Record field → column when the recipe names none: text (+ label for classification, + target
    for sequence-to-sequence)."""
    if objective in CLASSIFICATION:
        return {"text": "text", "label": "label"}
    if objective == "seq2seq-lm":
        return {"text": "text", "target": "target"}
    return {"text": "text"}


def read_chat_jsonl(path: Path) -> list[dict]:
    """Chat examples, one JSON object {"messages": [{role, content}, ...]} per line."""
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            obj = json.loads(line)
            if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
                raise D.DataError("expected an object with a 'messages' list", path, number)
            examples.append(obj)
    return examples


def infer_labels(records: Sequence, objective: str) -> tuple[str, ...]:
    if objective == "sequence-classification":
        return tuple(sorted({str(r.label) for r in records}))
    if objective == "token-classification":
        return tuple(sorted({tag for r in records for tag in r.tags}))
    return ()


def texts_of(records: Sequence) -> list[str]:
    """The plain text of text records (with their seq2seq targets), tagged sentences and chat examples
    (to train tokenizers on)."""
    return [text_of(r) for r in records]


def text_of(record) -> str:
    if hasattr(record, "text"):
        return record.text if getattr(record, "target", None) is None else f"{record.text}\n{record.target}"
    if hasattr(record, "tokens"):
        return " ".join(record.tokens)
    return " ".join(m["content"] for m in record["messages"])


# --- tokenizer ------------------------------------------------------------------------------------------

def train_tokenizer(texts: Sequence[str], vocab_size: int, kind: str) -> Tokenizer:
    """A new byte-level BPE (GPT-2 style, <|endoftext|> as bos/eos/pad), lowercase WordPiece (BERT
    style, [CLS] text [SEP]) or T5-style tokenizer (see `train_t5_tokenizer`) trained on `texts`.
    Deterministic for the same texts."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

    if kind == "t5":
        return train_t5_tokenizer(texts, vocab_size)
    if kind == "wordpiece":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        backend = Backend(models.WordPiece(unk_token="[UNK]"))
        backend.normalizer = normalizers.BertNormalizer(lowercase=True)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, limit_alphabet=100,
                                            show_progress=False)
        backend.train_from_iterator(texts, trainer)
        cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        return Tokenizer(backend, SpecialTokens(pad="[PAD]", unk="[UNK]", mask="[MASK]", cls="[CLS]", sep="[SEP]"))
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    eos = "<|endoftext|>"
    return Tokenizer(backend, SpecialTokens(bos=eos, eos=eos, pad=eos))


T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 as in T5's vocabulary (and the tiny-t5 preset)


def train_t5_tokenizer(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with T5's special tokens: <pad>=0 (also the decoder start), </s>=1 (appended to
    every encoded text, as T5's tokenizer does), <unk>=2. Byte-level, so no text is unknown."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(T5_SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
    return Tokenizer(backend, SpecialTokens(pad="<pad>", eos="</s>", unk="<unk>"))


def tokenizer_kind(section: TokenizerSection, objective: str) -> str:
    """auto: WordPiece for masked-LM, T5-style for seq2seq-LM, byte-level BPE otherwise."""
    if section.kind != "auto":
        return section.kind
    return {"masked-lm": "wordpiece", "seq2seq-lm": "t5"}.get(objective, "bpe")


def load_tokenizer(source: str) -> Tokenizer:
    from ..api import resolve

    path = resolve(source)
    return Tokenizer.from_gguf(path) if path.suffix == ".gguf" else Tokenizer.from_folder(path)


def build_tokenizer(cfg: RunConfig, model_tokenizer: Tokenizer | None, train_texts: Sequence[str]) -> Tokenizer:
    section: TokenizerSection = cfg.tokenizer
    if section.source is not None:
        return load_tokenizer(section.source)
    if section.train_vocab_size is None and model_tokenizer is not None:
        return model_tokenizer
    if cfg.model.preset is None and section.train_vocab_size is None:
        raise ValueError(f"model {cfg.model.source!r} has no tokenizer; set tokenizer.source")
    vocab = section.train_vocab_size or _preset(cfg.model).vocab_size
    return train_tokenizer(train_texts, vocab, tokenizer_kind(section, cfg.objective))


# --- model ------------------------------------------------------------------------------------------------

def _preset(section: ModelSection) -> ModelConfig:
    if section.preset not in PRESETS:
        raise ValueError(f"model.preset={section.preset!r} is not one of {sorted(PRESETS)}")
    return PRESETS[section.preset]


def scratch_config(section: ModelSection, tokenizer: Tokenizer, task: str, labels: tuple[str, ...]) -> ModelConfig:
    """The preset resized to the tokenizer's vocabulary, with the recipe's overrides."""
    preset = _preset(section)
    changes = {"vocab_size": tokenizer.vocab_size, "task": task, "labels": head_labels(task, labels),
               "pad_token_id": tokenizer.pad_id, "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    if preset.encoder_decoder:  # T5 starts decoding from its pad token
        changes["decoder_start_token_id"] = pad_id_of(tokenizer)
    return preset.replace(**{**changes, **dict(section.config)})


def head_labels(task: str, labels: tuple[str, ...]) -> tuple[str, ...]:
    """The class names a model of `task` keeps: a data set's labels mean nothing to a language model's head."""
    return labels if task in CLASSIFICATION else ()


def load_pretrained(source: str, task: str, labels: tuple[str, ...], dtype) -> tuple[Transformer, Tokenizer | None]:
    """A pretrained model with the head `task` needs. A checkpoint without that head (an encoder loaded
    for classification, an MLM artifact fine-tuned as a classifier, a classifier trained on other
    labels) keeps its backbone and gets a new, seeded head, as transformers does; head parts the
    checkpoint does hold (a bare BertModel's pooler) are loaded into it."""
    from ..api import load
    from ..io.weights import CheckpointError

    try:
        model, tokenizer = load(source, task=task, labels=labels or None, dtype=dtype)
        if model.config.task == task and (not labels or model.config.labels == labels):
            return model.train(), tokenizer
    except CheckpointError as error:
        if task == "base":
            raise
        log.debug("%s as %s: %s", source, task, error)
        model, tokenizer = load(source, task="base", dtype=dtype)
    log.info("%s: no %s head with labels %s in the checkpoint, initialising one", source, task, labels)
    return with_new_head(model, task, labels, source), tokenizer


HEADS = ("lm_head.", "mlm_head.", "classifier.")
CLASS_ROWS = "classifier.out."  # one row per label


def with_new_head(base: Transformer, task: str, labels: tuple[str, ...], source: str) -> Transformer:
    model = Transformer(base.config.replace(task=task, labels=labels)).to(base.dtype)
    backbone = {k: v for k, v in base.state_dict().items() if not k.startswith(HEADS)}
    missing, unexpected = model.load_state_dict(backbone, strict=False)
    assert not unexpected and all(k.startswith(HEADS) for k in missing), (missing, unexpected)
    model.tie_weights()
    loaded = load_head_parts(model, source)
    if loaded:
        log.info("%s: head parameters %s taken from the checkpoint", source, loaded)
    return model.train()


def load_head_parts(model: Transformer, source: str) -> list[str]:
    """Copy into `model` the head parameters that the checkpoint at `source` holds with matching shapes
    (found through the family's weight map), such as a bare BertModel's pooler. The class output layer
    is never copied: its rows mean the checkpoint's labels, not the new ones. The rest stays fresh."""
    from ..api import resolve
    from ..io.artifact import is_artifact, read_manifest
    from ..io.checkpoint import read_tensors, weight_files
    from ..io.weights import to_ours

    path = resolve(source)
    if not path.is_dir() or (is_artifact(path) and read_manifest(path).get("quantization")):
        return []  # GGUF files carry no classifier parts; quantized artifacts use our names, not HF's
    current = model.state_dict()
    tied = {"lm_head.weight", "mlm_head.decoder.weight"} if model.config.tie_word_embeddings else set()
    head = frozenset(k for k in current if k.startswith(HEADS) and k not in tied and not k.startswith(CLASS_ROWS))
    found, _ = to_ours(read_tensors(weight_files(path)), model.config, set(head), str(path), optional=head)
    usable = {k: t for k, t in found.items() if t.shape == current[k].shape}
    with torch.no_grad():
        for name, tensor in usable.items():
            current[name].copy_(tensor)
    return sorted(usable)


def with_config_overrides(model: Transformer, overrides: dict) -> Transformer:
    """Rebuild a loaded model with shape-preserving config changes (dropout rates, pooler, …)."""
    if not overrides:
        return model
    rebuilt = Transformer(model.config.replace(**overrides)).to(model.dtype)
    rebuilt.load_state_dict(model.state_dict())
    return rebuilt


def build_model(cfg: RunConfig, labels: tuple[str, ...]) -> tuple[Transformer | None, Tokenizer | None]:
    """The pretrained model and its tokenizer, or (None, None) for a preset (built once the tokenizer
    exists, because its vocabulary sets the embedding size)."""
    from ..api import parse_dtype

    if cfg.model.source is None:
        return None, None
    task = MODEL_TASKS[cfg.objective]
    model, tokenizer = load_pretrained(cfg.model.source, task, head_labels(task, labels), parse_dtype(cfg.model.dtype))
    model = with_config_overrides(model, dict(cfg.model.config))
    if cfg.model.quantize:
        quantize_base(model, cfg.model.quantize, cfg.model.quantize_group_size)
    return model, tokenizer


TASK_HEADS = ("classifier.*", "mlm_head.*")


def quantize_base(model: Transformer, method: str, group_size: int) -> None:
    """QLoRA's frozen base: the linear layers (not the output head) quantized in place at load."""
    from ..compress.quantize import DEFAULT_EXCLUDE, quantize_model

    if getattr(model, "quantization_config", None) is not None:
        raise ValueError(f"model.quantize={method!r}: the source is already quantized "
                         f"({model.quantization_config.method}); drop model.quantize")
    # the task heads train in full (modules_to_save), so they stay float
    quantize_model(model, method, group_size=group_size, exclude=(*DEFAULT_EXCLUDE, *TASK_HEADS))
    log.info("QLoRA base: %d linear layers quantized to %s", len(model.quantization_config.modules), method)


# --- features and batches -----------------------------------------------------------------------------

def encode_split(records: Sequence, objective: str, tokenizer: Tokenizer, section: DataSection,
                 labels: tuple[str, ...]):
    """A dataset (map-style) for one split."""
    if objective == "causal-lm":
        ids = [tokenizer.encode(text, add_special_tokens=False) for text in texts_of(records)]
        if tokenizer.eos_id is None:
            raise ValueError("causal-LM packing needs a tokenizer with an eos token")
        return D.PackedDataset(D.pack_for_causal_lm(ids, section.max_length, eos_id=tokenizer.eos_id))
    if objective == "masked-lm":
        return D.FeatureDataset(D.encode_texts(texts_of(records), tokenizer, section.max_length))
    if objective == "sequence-classification":
        named = [r if r.label is None or isinstance(r.label, str) else replace(r, label=str(r.label)) for r in records]
        return D.FeatureDataset(D.encode_classification(named, tokenizer, labels, section.max_length))
    if objective == "token-classification":
        return D.FeatureDataset(D.encode_tagged(records, tokenizer, labels, section.max_length))
    if objective == "seq2seq-lm":
        return D.FeatureDataset(D.encode_seq2seq(records, tokenizer, section.max_length, section.max_target_length))
    return D.FeatureDataset([D.encode_chat(r["messages"], tokenizer, section.max_length) for r in records])


def collate_for(objective: str, tokenizer: Tokenizer, section: DataSection, seed: int):
    if objective == "masked-lm":
        return D.MLMCollator.from_tokenizer(tokenizer, section.mlm_probability, seed)
    if objective == "causal-lm":
        return collate_blocks
    if objective == "seq2seq-lm":
        return partial(D.collate_seq2seq, pad_id=pad_id_of(tokenizer))
    return partial(D.collate_padded, pad_id=pad_id_of(tokenizer))


def collate_blocks(features: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Packed causal-LM rows: equal length, no padding, so no attention mask (SDPA's causal path)."""
    ids = torch.stack([torch.as_tensor(f["input_ids"]) for f in features])
    return {"input_ids": ids, "labels": ids}


def fixed_batches(dataset, collate, batch_size: int) -> list[Batch]:
    """Evaluation batches built once, in order (masked-LM masks drawn once, from their own seed)."""
    return [collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            for start in range(0, len(dataset), batch_size)]


def prepare_data(cfg: RunConfig, tokenizer: Tokenizer, splits: D.Splits, labels: tuple[str, ...]) -> PreparedData:
    sets = {name: encode_split(splits[name], cfg.objective, tokenizer, cfg.data, labels) if splits[name] else None
            for name in ("train", "validation", "test")}
    if sets["train"] is None or len(sets["train"]) == 0:
        raise ValueError(f"the training split is empty (data sizes: {splits.sizes()})")
    eval_size = cfg.train.eval_batch_size or cfg.train.batch_size
    batches = {name: fixed_batches(sets[name], collate_for(cfg.objective, tokenizer, cfg.data, cfg.data.seed + 1),
                                   eval_size) if sets[name] is not None else []
               for name in ("validation", "test")}
    train = TrainData(sets["train"], collate_for(cfg.objective, tokenizer, cfg.data, cfg.train.seed))
    sizes = {name: len(s) if s is not None else 0 for name, s in sets.items()}
    return PreparedData(train, batches["validation"], batches["test"], labels, sizes)


def build_objective(cfg: RunConfig, labels: tuple[str, ...]) -> Objective:
    objective = objective_for(cfg.objective, labels)
    if cfg.distill.teacher is not None:
        teacher, _ = load_pretrained(cfg.distill.teacher, MODEL_TASKS[cfg.objective], labels, torch.float32)
        d = cfg.distill
        objective = Distillation(objective, teacher.eval(), d.temperature, d.alpha, d.hidden_weight)
    if cfg.train.adversarial is not None:
        from ..robustness.adversarial import AdversarialObjective

        objective = AdversarialObjective(objective, cfg.train.adversarial)
    return objective
