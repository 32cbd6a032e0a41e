"""The one registry of model families: HF config ↔ ModelConfig mapping plus a weight-name map.

A family is data. Its weight map pairs our module names with the checkpoint's module names; each
pair says how the tensors move: `copy` (same layout), `conv1d` (GPT-2 stores Linear weights
transposed), `qkv_concat_conv1d` (GPT-2's fused c_attn) or `qkv_per_head` (GPT-NeoX's fused
query_key_value, interleaved per head). Names use `{i}` for the layer index.

Decoder-only and encoder-only families have one stack of layers (`layer_prefix` + `layer_map`);
encoder-decoder families (T5) list their stacks as `StackMap`s instead.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .config import ModelConfig, RopeScaling

ModuleMap = tuple[tuple[str, str, str], ...]  # (ours, theirs, kind)

TASK_SUFFIX = {
    "causal-lm": "ForCausalLM",
    "masked-lm": "ForMaskedLM",
    "sequence-classification": "ForSequenceClassification",
    "token-classification": "ForTokenClassification",
    "seq2seq-lm": "ForConditionalGeneration",
    "base": "Model",
}


@dataclass(frozen=True)
class StackMap:
    """One stack of identical layers: our and their per-layer prefixes and the per-layer module map.

    Entries for modules a layer does not have are skipped (T5 keeps its relative-position table in
    layer 0 only). The MLP part follows `config.gated_mlp`, because T5 v1.1 renames `wi` to `wi_0|wi_1`.
    """

    ours: str  # "encoder.layers.{i}."
    theirs: str  # "encoder.block.{i}.", relative to the backbone
    layer_map: ModuleMap
    decoder: bool = False  # counts config.decoder_layers instead of config.num_layers
    gated_mlp_map: ModuleMap = ()
    plain_mlp_map: ModuleMap = ()

    def pairs(self, config: ModelConfig) -> ModuleMap:
        return self.layer_map + (self.gated_mlp_map if config.gated_mlp else self.plain_mlp_map)


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # HF `model_type` values this family reads
    arch_prefix: str  # e.g. "Llama" → LlamaForCausalLM
    base_prefix: str  # where the backbone lives inside task checkpoints ("model.")
    layer_prefix: str  # HF name of layer i relative to the backbone ("layers.{i}.")
    backbone_map: ModuleMap  # embeddings and final norm, relative to the backbone
    layer_map: ModuleMap  # relative to our "layers.{i}." and their layer_prefix
    head_maps: dict[str, ModuleMap] = field(default_factory=dict)  # absolute checkpoint names per task
    config_from_hf: Callable[[dict], dict] = lambda d: {}
    config_to_hf: Callable[[ModelConfig], dict] = lambda c: {}
    base_prefix_aliases: tuple[str, ...] = ()  # other names used by some checkpoints
    stacks: tuple[StackMap, ...] = ()  # encoder-decoder families; empty: one stack from layer_prefix/layer_map

    def architecture(self, task: str) -> str:
        return self.arch_prefix + TASK_SUFFIX[task]

    def module_map(self, config: ModelConfig, base_prefix: str | None = None) -> list[tuple[str, str, str]]:
        """Concrete (our module, checkpoint module, kind) triples for this config and task."""
        prefix = self.base_prefix if base_prefix is None else base_prefix
        pairs = [(ours, prefix + theirs, kind) for ours, theirs, kind in self.backbone_map]
        for stack in self.stacks or (StackMap("layers.{i}.", self.layer_prefix, self.layer_map),):
            layer_pairs = stack.pairs(config)
            for i in range(config.decoder_layers if stack.decoder else config.num_layers):
                ours_layer, theirs_layer = stack.ours.format(i=i), prefix + stack.theirs.format(i=i)
                pairs += [(_prefixed(ours_layer, o), theirs_layer + t, k) for o, t, k in layer_pairs]
        pairs += list(self.head_maps.get(config.task, ()))
        return pairs


def _prefixed(prefix: str, modules: str) -> str:
    """Prefix each name of a fused group "a|b|c"."""
    return "|".join(prefix + m for m in modules.split("|"))


# --- shared pieces ------------------------------------------------------------------------------------
def _rope_from_hf(d: dict) -> dict:
    """Read RoPE settings from either the legacy keys or transformers 5's `rope_parameters`."""
    params = dict(d.get("rope_parameters") or {})
    legacy = d.get("rope_scaling") or {}
    theta = params.get("rope_theta", d.get("rope_theta", d.get("rotary_emb_base", 10000.0)))
    scaling = {**legacy, **{k: v for k, v in params.items() if k != "rope_theta"}}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    out = {"rope_theta": float(theta)}
    if "partial_rotary_factor" in scaling or "rotary_pct" in d:
        out["rotary_fraction"] = float(scaling.get("partial_rotary_factor", d.get("rotary_pct", 1.0)))
    if kind not in ("default", None):
        if kind not in ("linear", "llama3", "yarn", "dynamic"):
            raise ValueError(f"unsupported rope scaling type {kind!r} (supported: linear, llama3, yarn, dynamic)")
        out["rope_scaling"] = RopeScaling(
            kind=kind, factor=float(scaling["factor"]),
            original_max_position_embeddings=scaling.get("original_max_position_embeddings"),
            low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
            high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
            beta_fast=float(scaling.get("beta_fast", 32.0)), beta_slow=float(scaling.get("beta_slow", 1.0)),
        )
    return out


def _rope_to_hf(c: ModelConfig) -> dict:
    params: dict = {"rope_theta": c.rope_theta, "rope_type": "default"}
    out: dict = {"rope_theta": c.rope_theta}
    if c.rope_scaling is not None:
        s = c.rope_scaling
        scaling = {"rope_type": s.kind, "factor": s.factor}
        if s.original_max_position_embeddings:
            scaling["original_max_position_embeddings"] = s.original_max_position_embeddings
        if s.kind == "llama3":
            scaling.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
        if s.kind == "yarn":
            scaling.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow)
        params.update(scaling)
        out["rope_scaling"] = scaling
    if c.rotary_fraction != 1.0:
        params["partial_rotary_factor"] = c.rotary_fraction
    out["rope_parameters"] = params
    return out


_ACT_FROM_HF = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu"}
_ACT_TO_HF = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}


def _activation(name: str) -> str:
    if name not in _ACT_FROM_HF:
        raise ValueError(f"unsupported activation {name!r} (supported: {sorted(_ACT_FROM_HF)})")
    return _ACT_FROM_HF[name]


def _tokens(d: dict) -> dict:
    eos = d.get("eos_token_id")
    return {"pad_token_id": d.get("pad_token_id"), "bos_token_id": d.get("bos_token_id"),
            "eos_token_id": eos[0] if isinstance(eos, list) and eos else eos}


def _tokens_to_hf(c: ModelConfig) -> dict:
    return {"pad_token_id": c.pad_token_id, "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id}


# --- Llama / Mistral / Qwen2 ----------------------------------------------------------------------------
def _llama_from_hf(d: dict) -> dict:
    return dict(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"], num_kv_heads=d.get("num_key_value_heads"),
        head_dim=d.get("head_dim"), intermediate_size=d["intermediate_size"],
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        norm="rmsnorm", norm_eps=d.get("rms_norm_eps", 1e-6), activation=_activation(d.get("hidden_act", "silu")),
        gated_mlp=True, attn_qkv_bias=d.get("attention_bias", d.get("model_type") == "qwen2"),
        attn_out_bias=d.get("attention_bias", False), mlp_bias=d.get("mlp_bias", False),
        sliding_window=d.get("sliding_window") if d.get("use_sliding_window", True) else None,
        tie_word_embeddings=d.get("tie_word_embeddings", False), classifier_pooler="last",
        **_rope_from_hf(d), **_tokens(d),
    )


def _llama_to_hf(c: ModelConfig) -> dict:
    d = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, num_key_value_heads=c.kv_heads, head_dim=c.dim_per_head,
        intermediate_size=c.intermediate_size, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.norm_eps, hidden_act=_ACT_TO_HF[c.activation], attention_bias=c.attn_qkv_bias,
        mlp_bias=c.mlp_bias, tie_word_embeddings=c.tie_word_embeddings, **_rope_to_hf(c), **_tokens_to_hf(c),
    )
    if c.family == "qwen2":
        d.pop("attention_bias")
        d.pop("mlp_bias")
    if c.family == "mistral":
        d["sliding_window"] = c.sliding_window
    return d


_LLAMA_LAYER: ModuleMap = (
    ("attn_norm", "input_layernorm", "copy"),
    ("attn.q_proj", "self_attn.q_proj", "copy"),
    ("attn.k_proj", "self_attn.k_proj", "copy"),
    ("attn.v_proj", "self_attn.v_proj", "copy"),
    ("attn.o_proj", "self_attn.o_proj", "copy"),
    ("mlp_norm", "post_attention_layernorm", "copy"),
    ("mlp.gate_proj", "mlp.gate_proj", "copy"),
    ("mlp.up_proj", "mlp.up_proj", "copy"),
    ("mlp.down_proj", "mlp.down_proj", "copy"),
)
_DECODER_HEADS = {
    "causal-lm": (("lm_head", "lm_head", "copy"),),
    "sequence-classification": (("classifier.out", "score", "copy"),),
    "token-classification": (("classifier.out", "score", "copy"),),
}


def _llama_like(name: str, model_type: str, arch: str) -> Family:
    return Family(
        name=name, model_types=(model_type,), arch_prefix=arch, base_prefix="model.", layer_prefix="layers.{i}.",
        backbone_map=(("embed.tokens", "embed_tokens", "copy"), ("norm", "norm", "copy")),
        layer_map=_LLAMA_LAYER, head_maps=_DECODER_HEADS,
        config_from_hf=_llama_from_hf, config_to_hf=_llama_to_hf,
    )


# --- GPT-2 -------------------------------------------------------------------------------------------
def _gpt2_from_hf(d: dict) -> dict:
    h = d.get("n_embd", 768)
    return dict(
        vocab_size=d["vocab_size"], hidden_size=h, num_layers=d.get("n_layer", 12), num_heads=d.get("n_head", 12),
        intermediate_size=d.get("n_inner") or 4 * h, max_position_embeddings=d.get("n_positions", 1024),
        position="learned", norm="layernorm", norm_eps=d.get("layer_norm_epsilon", 1e-5),
        activation=_activation(d.get("activation_function", "gelu_new")), gated_mlp=False,
        attn_qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_word_embeddings=d.get("tie_word_embeddings", True),
        classifier_pooler="last", **_tokens(d),
    )


def _gpt2_to_hf(c: ModelConfig) -> dict:
    return dict(
        vocab_size=c.vocab_size, n_embd=c.hidden_size, n_layer=c.num_layers, n_head=c.num_heads,
        n_inner=c.intermediate_size, n_positions=c.max_position_embeddings, layer_norm_epsilon=c.norm_eps,
        activation_function=_ACT_TO_HF[c.activation], tie_word_embeddings=c.tie_word_embeddings,
        **_tokens_to_hf(c),
    )


GPT2 = Family(
    name="gpt2", model_types=("gpt2",), arch_prefix="GPT2", base_prefix="transformer.", layer_prefix="h.{i}.",
    backbone_map=(("embed.tokens", "wte", "copy"), ("embed.positions", "wpe", "copy"), ("norm", "ln_f", "copy")),
    layer_map=(
        ("attn_norm", "ln_1", "copy"),
        ("attn.q_proj|attn.k_proj|attn.v_proj", "attn.c_attn", "qkv_concat_conv1d"),
        ("attn.o_proj", "attn.c_proj", "conv1d"),
        ("mlp_norm", "ln_2", "copy"),
        ("mlp.up_proj", "mlp.c_fc", "conv1d"),
        ("mlp.down_proj", "mlp.c_proj", "conv1d"),
    ),
    head_maps={
        "causal-lm": (("lm_head", "lm_head", "copy"),),
        "sequence-classification": (("classifier.out", "score", "copy"),),
        "token-classification": (("classifier.out", "classifier", "copy"),),
    },
    config_from_hf=_gpt2_from_hf, config_to_hf=_gpt2_to_hf,
)


# --- GPT-NeoX (Pythia) ------------------------------------------------------------------------------
def _neox_from_hf(d: dict) -> dict:
    return dict(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"], intermediate_size=d["intermediate_size"],
        max_position_embeddings=d.get("max_position_embeddings", 2048), norm="layernorm",
        norm_eps=d.get("layer_norm_eps", 1e-5), activation=_activation(d.get("hidden_act", "gelu")), gated_mlp=False,
        attn_qkv_bias=d.get("attention_bias", True), attn_out_bias=d.get("attention_bias", True), mlp_bias=True,
        parallel_residual=d.get("use_parallel_residual", True), tie_word_embeddings=d.get("tie_word_embeddings", False),
        classifier_pooler="last", **_rope_from_hf(d), **_tokens(d),
    )


def _neox_to_hf(c: ModelConfig) -> dict:
    return dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings, layer_norm_eps=c.norm_eps,
        hidden_act=_ACT_TO_HF[c.activation], use_parallel_residual=c.parallel_residual,
        attention_bias=c.attn_qkv_bias, tie_word_embeddings=c.tie_word_embeddings,
        rotary_pct=c.rotary_fraction, rotary_emb_base=c.rope_theta, **_rope_to_hf(c), **_tokens_to_hf(c),
    )


GPT_NEOX = Family(
    name="gpt_neox", model_types=("gpt_neox",), arch_prefix="GPTNeoX", base_prefix="gpt_neox.",
    layer_prefix="layers.{i}.",
    backbone_map=(("embed.tokens", "embed_in", "copy"), ("norm", "final_layer_norm", "copy")),
    layer_map=(
        ("attn_norm", "input_layernorm", "copy"),
        ("attn.q_proj|attn.k_proj|attn.v_proj", "attention.query_key_value", "qkv_per_head"),
        ("attn.o_proj", "attention.dense", "copy"),
        ("mlp_norm", "post_attention_layernorm", "copy"),
        ("mlp.up_proj", "mlp.dense_h_to_4h", "copy"),
        ("mlp.down_proj", "mlp.dense_4h_to_h", "copy"),
    ),
    head_maps={
        "causal-lm": (("lm_head", "embed_out", "copy"),),
        "sequence-classification": (("classifier.out", "score", "copy"),),
        "token-classification": (("classifier.out", "classifier", "copy"),),
    },
    config_from_hf=_neox_from_hf, config_to_hf=_neox_to_hf,
)


# --- BERT / DistilBERT ---------------------------------------------------------------------------------
def _bert_from_hf(d: dict) -> dict:
    if d.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"unsupported BERT position_embedding_type {d['position_embedding_type']!r}")
    return dict(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
        num_heads=d["num_attention_heads"], intermediate_size=d["intermediate_size"],
        max_position_embeddings=d.get("max_position_embeddings", 512), causal=False, position="learned",
        type_vocab_size=d.get("type_vocab_size", 2), norm="layernorm", norm_eps=d.get("layer_norm_eps", 1e-12),
        norm_position="post", embed_norm=True, final_norm=False, activation=_activation(d.get("hidden_act", "gelu")),
        gated_mlp=False, attn_qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_word_embeddings=True,
        hidden_dropout=d.get("hidden_dropout_prob", 0.1), attention_dropout=d.get("attention_probs_dropout_prob", 0.1),
        classifier_dropout=d.get("classifier_dropout") or d.get("hidden_dropout_prob", 0.1),
        classifier_pooler="cls_dense_tanh", pad_token_id=d.get("pad_token_id", 0),
    )


def _bert_to_hf(c: ModelConfig) -> dict:
    return dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings, type_vocab_size=c.type_vocab_size,
        layer_norm_eps=c.norm_eps, hidden_act=_ACT_TO_HF[c.activation], hidden_dropout_prob=c.hidden_dropout,
        attention_probs_dropout_prob=c.attention_dropout, classifier_dropout=c.classifier_dropout,
        position_embedding_type="absolute", pad_token_id=c.pad_token_id,
    )


BERT = Family(
    name="bert", model_types=("bert",), arch_prefix="Bert", base_prefix="bert.", layer_prefix="encoder.layer.{i}.",
    backbone_map=(
        ("embed.tokens", "embeddings.word_embeddings", "copy"),
        ("embed.positions", "embeddings.position_embeddings", "copy"),
        ("embed.token_types", "embeddings.token_type_embeddings", "copy"),
        ("embed.norm", "embeddings.LayerNorm", "copy"),
    ),
    layer_map=(
        ("attn.q_proj", "attention.self.query", "copy"),
        ("attn.k_proj", "attention.self.key", "copy"),
        ("attn.v_proj", "attention.self.value", "copy"),
        ("attn.o_proj", "attention.output.dense", "copy"),
        ("attn_norm", "attention.output.LayerNorm", "copy"),
        ("mlp.up_proj", "intermediate.dense", "copy"),
        ("mlp.down_proj", "output.dense", "copy"),
        ("mlp_norm", "output.LayerNorm", "copy"),
    ),
    head_maps={
        "masked-lm": (
            ("mlm_head.dense", "cls.predictions.transform.dense", "copy"),
            ("mlm_head.norm", "cls.predictions.transform.LayerNorm", "copy"),
            ("mlm_head.decoder", "cls.predictions.decoder", "copy"),
        ),
        "sequence-classification": (
            ("classifier.pooler", "bert.pooler.dense", "copy"), ("classifier.out", "classifier", "copy"),
        ),
        "token-classification": (("classifier.out", "classifier", "copy"),),
    },
    config_from_hf=_bert_from_hf, config_to_hf=_bert_to_hf,
)


def _distilbert_from_hf(d: dict) -> dict:
    return dict(
        vocab_size=d["vocab_size"], hidden_size=d.get("dim", 768), num_layers=d.get("n_layers", 6),
        num_heads=d.get("n_heads", 12), intermediate_size=d.get("hidden_dim", 3072),
        max_position_embeddings=d.get("max_position_embeddings", 512), causal=False, position="learned",
        norm="layernorm", norm_eps=1e-12, norm_position="post", embed_norm=True, final_norm=False,
        activation=_activation(d.get("activation", "gelu")), gated_mlp=False, attn_qkv_bias=True,
        attn_out_bias=True, mlp_bias=True, tie_word_embeddings=True, hidden_dropout=d.get("dropout", 0.1),
        attention_dropout=d.get("attention_dropout", 0.1), classifier_dropout=d.get("seq_classif_dropout", 0.2),
        classifier_pooler="cls_dense_relu", pad_token_id=d.get("pad_token_id", 0),
    )


def _distilbert_to_hf(c: ModelConfig) -> dict:
    return dict(
        vocab_size=c.vocab_size, dim=c.hidden_size, n_layers=c.num_layers, n_heads=c.num_heads,
        hidden_dim=c.intermediate_size, max_position_embeddings=c.max_position_embeddings,
        activation=_ACT_TO_HF[c.activation], dropout=c.hidden_dropout, attention_dropout=c.attention_dropout,
        seq_classif_dropout=c.classifier_dropout, pad_token_id=c.pad_token_id, sinusoidal_pos_embds=False,
    )


DISTILBERT = Family(
    name="distilbert", model_types=("distilbert",), arch_prefix="DistilBert", base_prefix="distilbert.",
    layer_prefix="transformer.layer.{i}.",
    backbone_map=(
        ("embed.tokens", "embeddings.word_embeddings", "copy"),
        ("embed.positions", "embeddings.position_embeddings", "copy"),
        ("embed.norm", "embeddings.LayerNorm", "copy"),
    ),
    layer_map=(
        ("attn.q_proj", "attention.q_lin", "copy"),
        ("attn.k_proj", "attention.k_lin", "copy"),
        ("attn.v_proj", "attention.v_lin", "copy"),
        ("attn.o_proj", "attention.out_lin", "copy"),
        ("attn_norm", "sa_layer_norm", "copy"),
        ("mlp.up_proj", "ffn.lin1", "copy"),
        ("mlp.down_proj", "ffn.lin2", "copy"),
        ("mlp_norm", "output_layer_norm", "copy"),
    ),
    head_maps={
        "masked-lm": (
            ("mlm_head.dense", "vocab_transform", "copy"),
            ("mlm_head.norm", "vocab_layer_norm", "copy"),
            ("mlm_head.decoder", "vocab_projector", "copy"),
        ),
        "sequence-classification": (
            ("classifier.pooler", "pre_classifier", "copy"), ("classifier.out", "classifier", "copy"),
        ),
        "token-classification": (("classifier.out", "classifier", "copy"),),
    },
    config_from_hf=_distilbert_from_hf, config_to_hf=_distilbert_to_hf,
)

# --- T5 (original and v1.1 / flan-t5) ---------------------------------------------------------------------
def _t5_from_hf(d: dict) -> dict:
    arch = (d.get("architectures") or [None])[0]
    if arch not in (None, "T5ForConditionalGeneration", "T5Model"):
        raise ValueError(f"unsupported T5 architecture {arch!r} (supported: T5ForConditionalGeneration, T5Model)")
    proj = d.get("feed_forward_proj", "relu")
    # transformers reads "gated-gelu" as the tanh approximation (gelu_new), for backward compatibility.
    act = "gelu_new" if proj == "gated-gelu" else proj.removeprefix("gated-")
    # v1.1 / flan-t5 untie the LM head and drop original T5's hidden_size**-0.5 rescaling together;
    # transformers 5 writes the rescaling flag itself (and tie_word_embeddings=True whatever the head).
    scaled = d.get("scale_decoder_outputs", d.get("tie_word_embeddings", True) is not False)
    layers, dropout, eos = d.get("num_layers", 6), d.get("dropout_rate", 0.1), d.get("eos_token_id", 1)
    return {
        "vocab_size": d.get("vocab_size", 32128), "hidden_size": d.get("d_model", 512), "num_layers": layers,
        "num_decoder_layers": d.get("num_decoder_layers") or layers, "num_heads": d.get("num_heads", 8),
        "head_dim": d.get("d_kv", 64), "intermediate_size": d.get("d_ff", 2048),
        "max_position_embeddings": d.get("n_positions", 512), "position": "relative", "attention_scale": 1.0,
        "relative_num_buckets": d.get("relative_attention_num_buckets", 32),
        "relative_max_distance": d.get("relative_attention_max_distance", 128), "norm": "rmsnorm",
        "norm_eps": d.get("layer_norm_epsilon", 1e-6), "activation": _activation(act),
        "gated_mlp": proj.startswith("gated-"), "encoder_decoder": True, "tie_word_embeddings": scaled,
        "scale_lm_head_input": scaled, "hidden_dropout": dropout, "attention_dropout": dropout,
        "mlp_dropout": dropout, "final_dropout": dropout,
        "pad_token_id": d.get("pad_token_id", 0), "eos_token_id": _tokens({"eos_token_id": eos})["eos_token_id"],
        "decoder_start_token_id": d.get("decoder_start_token_id", d.get("pad_token_id", 0)),
    }


_T5_LAYOUT = {"position": "relative", "attention_scale": 1.0, "norm": "rmsnorm", "norm_position": "pre",
              "encoder_decoder": True, "attn_qkv_bias": False, "attn_out_bias": False, "mlp_bias": False,
              "parallel_residual": False, "final_norm": True}


def _t5_to_hf(c: ModelConfig) -> dict:
    wrong = {k: getattr(c, k) for k, v in _T5_LAYOUT.items() if getattr(c, k) != v}
    if wrong:
        raise ValueError(f"a T5 checkpoint cannot hold this model: {wrong} (T5 needs {_T5_LAYOUT})")
    if c.gated_mlp and c.activation == "gelu":
        raise ValueError("T5 checkpoints cannot express a gated exact-GELU MLP ('gated-gelu' means gelu_tanh)")
    act = _ACT_TO_HF[c.activation]
    proj = ("gated-gelu" if c.activation == "gelu_tanh" else f"gated-{act}") if c.gated_mlp else act
    return {
        "vocab_size": c.vocab_size, "d_model": c.hidden_size, "d_kv": c.dim_per_head, "d_ff": c.intermediate_size,
        "num_layers": c.num_layers, "num_decoder_layers": c.decoder_layers, "num_heads": c.num_heads,
        "relative_attention_num_buckets": c.relative_num_buckets,
        "relative_attention_max_distance": c.relative_max_distance, "dropout_rate": c.hidden_dropout,
        "layer_norm_epsilon": c.norm_eps, "feed_forward_proj": proj, "is_encoder_decoder": True,
        "tie_word_embeddings": c.tie_word_embeddings, "scale_decoder_outputs": c.scale_lm_head_input,
        "n_positions": c.max_position_embeddings, "decoder_start_token_id": c.decoder_start_token_id,
        "pad_token_id": c.pad_token_id, "eos_token_id": c.eos_token_id,
    }


def _t5_attention(sublayer: str, ours: str, theirs: str) -> ModuleMap:
    return tuple((f"{ours}.{p}_proj", f"{sublayer}.{theirs}.{p}", "copy") for p in "qkvo")


def _t5_stack(stack: str, mlp_sublayer: int, cross: bool) -> StackMap:
    ff = f"layer.{mlp_sublayer}"
    self_attn = (("attn_norm", "layer.0.layer_norm", "copy"), *_t5_attention("layer.0", "attn", "SelfAttention"),
                 ("attn.relative_bias", "layer.0.SelfAttention.relative_attention_bias", "copy"))  # layer 0 only
    cross_attn = (("cross_attn_norm", "layer.1.layer_norm", "copy"),
                  *_t5_attention("layer.1", "cross_attn", "EncDecAttention")) if cross else ()
    return StackMap(
        ours=f"{stack}.layers.{{i}}.", theirs=f"{stack}.block.{{i}}.", decoder=cross,
        layer_map=(*self_attn, *cross_attn, ("mlp_norm", f"{ff}.layer_norm", "copy"),
                   ("mlp.down_proj", f"{ff}.DenseReluDense.wo", "copy")),
        gated_mlp_map=(("mlp.gate_proj", f"{ff}.DenseReluDense.wi_0", "copy"),
                       ("mlp.up_proj", f"{ff}.DenseReluDense.wi_1", "copy")),
        plain_mlp_map=(("mlp.up_proj", f"{ff}.DenseReluDense.wi", "copy"),),
    )


T5 = Family(
    name="t5", model_types=("t5",), arch_prefix="T5", base_prefix="", layer_prefix="", layer_map=(),
    backbone_map=(("embed.tokens", "shared", "copy"), ("encoder.norm", "encoder.final_layer_norm", "copy"),
                  ("decoder.norm", "decoder.final_layer_norm", "copy")),
    stacks=(_t5_stack("encoder", 1, cross=False), _t5_stack("decoder", 2, cross=True)),
    head_maps={"seq2seq-lm": (("lm_head", "lm_head", "copy"),)},
    config_from_hf=_t5_from_hf, config_to_hf=_t5_to_hf,
)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        _llama_like("llama", "llama", "Llama"),
        _llama_like("mistral", "mistral", "Mistral"),
        _llama_like("qwen2", "qwen2", "Qwen2"),
        GPT2,
        GPT_NEOX,
        BERT,
        DISTILBERT,
        T5,
    )
}
# GPT-2's causal-LM class predates the *ForCausalLM naming.
ARCH_OVERRIDES = {("gpt2", "causal-lm"): "GPT2LMHeadModel"}


def family_for_model_type(model_type: str) -> Family:
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise ValueError(f"unsupported architecture (model_type {model_type!r}); supported: {supported}")


def architecture_name(config: ModelConfig) -> str:
    family = FAMILIES[config.family]
    return ARCH_OVERRIDES.get((config.family, config.task), family.architecture(config.task))


def task_from_architecture(arch: str | None) -> str:
    """LlamaForCausalLM → causal-lm; a bare *Model → base."""
    if not arch:
        return "base"
    if arch.endswith("LMHeadModel"):
        return "causal-lm"
    for task, suffix in TASK_SUFFIX.items():
        if arch.endswith(suffix):
            return task
    raise ValueError(f"unsupported architecture {arch!r}: no known head suffix in {sorted(TASK_SUFFIX.values())}")


def config_from_hf(d: dict, task: str | None = None, labels: tuple[str, ...] | None = None) -> ModelConfig:
    """A transformers config.json dict → ModelConfig (task from `architectures` unless given)."""
    model_type = d.get("model_type")
    if not model_type:
        raise ValueError("config.json has no model_type")
    family = family_for_model_type(model_type)
    archs = d.get("architectures") or [None]
    task = task or task_from_architecture(archs[0])
    if labels is None and task in ("sequence-classification", "token-classification"):
        id2label = d.get("id2label") or {}
        labels = tuple(id2label[k] for k in sorted(id2label, key=int))
    fields = family.config_from_hf(d)
    fields.update(task=task, labels=tuple(labels or ()), family=family.name, name=d.get("_name_or_path", ""))
    if family.name == "bert" and task == "causal-lm":
        raise ValueError("BERT checkpoints are encoders; use task 'masked-lm', 'base' or a classifier")
    return ModelConfig(**fields)


def config_to_hf(config: ModelConfig) -> dict:
    family = FAMILIES[config.family]
    d = {"model_type": family.model_types[0], "architectures": [architecture_name(config)]}
    d.update(family.config_to_hf(config))
    if config.labels:
        d["id2label"] = {str(i): name for i, name in enumerate(config.labels)}
        d["label2id"] = {name: i for i, name in enumerate(config.labels)}
    return d
