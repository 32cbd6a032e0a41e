"""The frozen description of a Transformer: every family is one of these, not a subclass.

A `ModelConfig` says everything the generic Transformer needs to build itself: sizes, which norm
and where, how positions enter, which MLP, which biases, and which head sits on top. Family quirks
(GPT-NeoX's parallel residual, Qwen2's qkv bias, BERT's post-norm) are fields here, so adding a
family means adding data in `families.py`, never a new forward pass.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

Task = Literal["base", "causal-lm", "masked-lm", "sequence-classification", "token-classification", "seq2seq-lm"]
TASKS: tuple[str, ...] = ("base", "causal-lm", "masked-lm", "sequence-classification", "token-classification",
                          "seq2seq-lm")
SEQ2SEQ_TASKS = ("seq2seq-lm", "base")  # what an encoder-decoder model can be loaded as
POSITIONS = ("rope", "learned", "none", "relative")
NORMS = ("rmsnorm", "layernorm")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling as used by released checkpoints (HF's `rope_scaling`)."""

    kind: Literal["linear", "llama3", "yarn", "dynamic"]
    factor: float
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn


@dataclass(frozen=True)
class ModelConfig:
    # sizes
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    num_kv_heads: int | None = None  # None: multi-head (= num_heads); fewer: grouped-query
    head_dim: int | None = None  # None: hidden_size // num_heads
    max_position_embeddings: int = 2048
    # attention
    causal: bool = True  # encoder-decoder: describes the decoder (the encoder is always bidirectional)
    attention_scale: float | None = None  # None: 1/sqrt(head_dim); T5 does not scale q·k (1.0)
    attn_qkv_bias: bool = False
    attn_out_bias: bool = False
    sliding_window: int | None = None
    # positions
    position: Literal["rope", "learned", "none", "relative"] = "rope"
    rope_theta: float = 10000.0
    rotary_fraction: float = 1.0  # GPT-NeoX rotates only the first rotary_pct of each head
    rope_scaling: RopeScaling | None = None
    position_offset: int = 0  # OPT-style learned-position offset (kept for future families)
    type_vocab_size: int = 0  # BERT token types; 0 means none
    # position="relative" (T5): a learned per-head bias over log-spaced distance buckets
    relative_num_buckets: int = 32
    relative_max_distance: int = 128
    # block layout
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-6
    norm_position: Literal["pre", "post"] = "pre"
    parallel_residual: bool = False  # GPT-NeoX/GPT-J: x + attn(ln1 x) + mlp(ln2 x)
    embed_norm: bool = False  # BERT normalises the summed embeddings
    final_norm: bool = True
    # encoder-decoder (T5): an encoder stack, then a decoder stack whose blocks add cross-attention
    encoder_decoder: bool = False
    num_decoder_layers: int | None = None  # None: num_layers
    # MLP
    activation: Literal["silu", "gelu", "gelu_tanh", "relu"] = "silu"
    gated_mlp: bool = True  # SwiGLU-style gate_proj * up_proj
    mlp_bias: bool = False
    # embeddings / head
    tie_word_embeddings: bool = False
    scale_lm_head_input: bool = False  # original T5: final hidden states × hidden_size**-0.5 before lm_head
    task: Task = "causal-lm"
    labels: tuple[str, ...] = ()  # class names for classification heads
    classifier_pooler: Literal["cls_dense_tanh", "cls_dense_relu", "cls", "last", "mean"] = "cls_dense_tanh"
    mlm_head_bias: bool = True
    # dropout (training only)
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    classifier_dropout: float = 0.0
    mlp_dropout: float = 0.0  # inside the MLP, after the activation (T5's DenseReluDense)
    final_dropout: float = 0.0  # after an encoder/decoder stack's final norm (T5)
    # tokens
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    decoder_start_token_id: int | None = None  # encoder-decoder: the decoder's first input token
    # provenance
    family: str = "llama"
    name: str = ""
    extra: tuple[tuple[str, object], ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        _check_positive(self, ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"))
        _check_choice("task", self.task, TASKS)
        _check_choice("position", self.position, POSITIONS)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("activation", self.activation, ACTIVATIONS)
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.kv_heads}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; set head_dim"
            )
        if not 0.0 < self.rotary_fraction <= 1.0:
            raise ValueError(f"rotary_fraction={self.rotary_fraction} must be in (0, 1]")
        if self.task in ("sequence-classification", "token-classification") and not self.labels:
            raise ValueError(f"task={self.task!r} needs labels (the class names)")
        _check_encoder_decoder(self)
        if self.position == "relative":
            _check_relative(self)

    # derived sizes -----------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.dim_per_head * self.rotary_fraction)

    @property
    def decoder_layers(self) -> int:
        """Layers of the decoder stack (encoder-decoder models); num_layers otherwise."""
        return self.num_decoder_layers or self.num_layers

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["labels"] = list(self.labels)
        d["extra"] = dict(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {sorted(unknown)}")
        d = dict(d)
        if d.get("rope_scaling"):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["labels"] = tuple(d.get("labels", ()))
        d["extra"] = tuple(sorted(dict(d.get("extra", {})).items()))
        return cls(**d)


def _check_positive(cfg: ModelConfig, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")


def _check_encoder_decoder(cfg: ModelConfig) -> None:
    if cfg.encoder_decoder and cfg.task not in SEQ2SEQ_TASKS:
        raise ValueError(f"an encoder-decoder model supports task {SEQ2SEQ_TASKS}, got task={cfg.task!r}")
    if cfg.task == "seq2seq-lm" and not cfg.encoder_decoder:
        raise ValueError("task='seq2seq-lm' needs encoder_decoder=True")
    layers = cfg.num_decoder_layers
    if layers is not None and (not isinstance(layers, int) or layers <= 0):
        raise ValueError(f"ModelConfig.num_decoder_layers must be a positive integer or None, got {layers!r}")


def _check_relative(cfg: ModelConfig) -> None:
    # Half the buckets (a quarter when bidirectional) are exact distances; the log-spaced rest need
    # max_distance beyond them, or the bucket formula divides by log(<= 1).
    if cfg.relative_num_buckets < 4:
        raise ValueError(f"ModelConfig.relative_num_buckets={cfg.relative_num_buckets} must be >= 4")
    if cfg.relative_max_distance <= cfg.relative_num_buckets // 2:
        raise ValueError(f"ModelConfig.relative_max_distance={cfg.relative_max_distance} must exceed "
                         f"relative_num_buckets // 2 = {cfg.relative_num_buckets // 2}")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"ModelConfig.{name}={value!r} is not one of {allowed}")


# Small named configs for pretraining from scratch and for tests.
PRESETS: dict[str, ModelConfig] = {
    "tiny-gpt": ModelConfig(
        vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256,
        max_position_embeddings=256, position="learned", norm="layernorm", norm_eps=1e-5,
        activation="gelu_tanh", gated_mlp=False, attn_qkv_bias=True, attn_out_bias=True, mlp_bias=True,
        tie_word_embeddings=True, family="gpt2", name="tiny-gpt",
    ),
    "tiny-llama": ModelConfig(
        vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=172,
        max_position_embeddings=256, tie_word_embeddings=True, family="llama", name="tiny-llama",
    ),
    "tiny-bert": ModelConfig(
        vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256,
        max_position_embeddings=256, causal=False, position="learned", type_vocab_size=2,
        norm="layernorm", norm_eps=1e-12, norm_position="post", embed_norm=True, final_norm=False,
        activation="gelu", gated_mlp=False, attn_qkv_bias=True, attn_out_bias=True, mlp_bias=True,
        tie_word_embeddings=True, task="masked-lm", family="bert", name="tiny-bert",
    ),
    "tiny-t5": ModelConfig(
        vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, head_dim=16, intermediate_size=128,
        max_position_embeddings=256, position="relative", attention_scale=1.0, encoder_decoder=True,
        activation="gelu_tanh", gated_mlp=True, task="seq2seq-lm", pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, family="t5", name="tiny-t5",
    ),
}
