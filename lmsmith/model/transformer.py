"""The one generic Transformer: every family is a ModelConfig, never a new forward pass."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention, AttentionInputs, KVCache
from .config import ModelConfig
from .heads import MaskedLMHead, SequenceClassifier, TokenClassifier
from .layers import MLP, Embeddings, make_norm
from .ops import attention_mask_4d, let_empty_rows_attend, rope_attention_factor, rope_cos_sin, rope_inv_freq


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # task output; None for task="base"
    hidden_states: torch.Tensor  # final hidden states (B, T, H)
    all_hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings + every layer
    attentions: tuple[torch.Tensor, ...] | None = None  # per layer (B, H, T, S)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.post_norm = config.norm_position == "post"
        self.parallel = config.parallel_residual

    def forward(self, x: torch.Tensor, inp: AttentionInputs):
        if self.post_norm:  # BERT: normalise after each residual sum
            a, w = self.attn(x, inp)
            h = self.attn_norm(x + self.dropout(a))
            return self.mlp_norm(h + self.dropout(self.mlp(h))), w
        a, w = self.attn(self.attn_norm(x), inp)
        if self.parallel:  # GPT-NeoX: attention and MLP both read the block input
            return x + self.dropout(a) + self.dropout(self.mlp(self.mlp_norm(x))), w
        h = x + self.dropout(a)
        return h + self.dropout(self.mlp(self.mlp_norm(h))), w


class Transformer(nn.Module):
    """Embeddings → blocks → final norm → the task head named by `config.task`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = Embeddings(config)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = make_norm(config) if config.final_norm else None
        self._build_head(config)
        if config.position == "relative":
            raise NotImplementedError("relative position buckets (T5) are not implemented yet")
        if config.position == "rope":
            self.register_buffer("inv_freq", self._inv_freq(), persistent=False)
        self.activation_checkpointing = False
        self.apply(self._init_weights)
        self.tie_weights()

    def _inv_freq(self) -> torch.Tensor:
        c = self.config
        return rope_inv_freq(c.rotary_dim, c.rope_theta, c.rope_scaling)

    def _apply(self, fn, recurse=True):
        # .to(bfloat16) would cast the RoPE frequencies too: in bf16 an angle at position 1000 is off by
        # ~2 radians. Keep them float32 (as transformers does) whatever dtype the weights take.
        super()._apply(fn, recurse)
        inv_freq = getattr(self, "inv_freq", None)
        if inv_freq is not None and inv_freq.dtype != torch.float32:
            self.inv_freq = self._inv_freq().to(inv_freq.device)
        return self

    def reset_buffers(self) -> None:
        """Recompute derived buffers and re-tie weights (after `to_empty`, which unties and wipes them)."""
        if self.config.position == "rope":
            self.inv_freq = self._inv_freq().to(self.embed.tokens.weight.device)
        self.tie_weights()

    def _build_head(self, config: ModelConfig) -> None:
        h = config.hidden_size
        if config.task == "causal-lm":
            self.lm_head = nn.Linear(h, config.vocab_size, bias=False)
        elif config.task == "masked-lm":
            self.mlm_head = MaskedLMHead(config)
        elif config.task == "sequence-classification":
            self.classifier = SequenceClassifier(config)
        elif config.task == "token-classification":
            self.classifier = TokenClassifier(config)

    def tie_weights(self) -> None:
        if not self.config.tie_word_embeddings:
            return
        if self.config.task == "causal-lm":
            self.lm_head.weight = self.embed.tokens.weight
        elif self.config.task == "masked-lm":
            self.mlm_head.decoder.weight = self.embed.tokens.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # Skipped on the meta device (checkpoint loading): nothing to initialise, and random init there
        # imports torch._dynamo, which costs seconds.
        if isinstance(module, (nn.Linear, nn.Embedding)) and not module.weight.is_meta:
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    # --- forward ---------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, S) 1 = real token, over cached + new keys
        position_ids: torch.Tensor | None = None,  # (B, T)
        token_type_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        prefix: tuple[torch.Tensor, ...] | None = None,
        logits_to_keep: int = 0,  # >0: only the last n positions get logits (saves the vocab matmul)
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> ModelOutput:
        B, T = input_ids.shape
        past = getattr(cache, "length", 0) if cache is not None else 0
        if past + T > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {past + T} tokens exceeds the context window of "
                f"{self.config.max_position_embeddings} tokens"
            )
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        encoder = getattr(self, "prefix_encoder", None)  # set by prefix tuning (train/peft)
        if prefix is None and encoder is not None and not getattr(encoder, "disabled", False):
            prefix = encoder.key_values(B, self.dtype)
        inp = self._attention_inputs(position_ids, attention_mask, past, T, cache, prefix, output_attentions)
        x = self.embed(input_ids, position_ids, token_type_ids)
        hidden, weights = [x], []
        for block in self.layers:
            if self.activation_checkpointing and self.training:
                x, w = checkpoint(block, x, inp, use_reentrant=False)
            else:
                x, w = block(x, inp)
            hidden.append(x)
            weights.append(w)
        if cache is not None and hasattr(cache, "advance"):
            cache.advance(T)
        if self.norm is not None:
            x = self.norm(x)
            hidden[-1] = x
        return ModelOutput(
            logits=self._head(x, attention_mask, logits_to_keep),
            hidden_states=x,
            all_hidden_states=tuple(hidden) if output_hidden_states else None,
            attentions=tuple(weights) if output_attentions else None,
        )

    def _attention_inputs(self, position_ids, attention_mask, past, T, cache, prefix, need_weights):
        cfg = self.config
        cos = sin = None
        if cfg.position == "rope":
            cos, sin = rope_cos_sin(position_ids, self.inv_freq, rope_attention_factor(cfg.rope_scaling))
        num_keys = past + T
        custom = getattr(cache, "attention_mask_4d", None)
        if custom is not None:  # a paged cache over ragged sequences supplies its own (B, 1, T, S) mask
            return AttentionInputs(cos, sin, let_empty_rows_attend(custom), False, cache, prefix, need_weights)
        simple_causal = cfg.causal and attention_mask is None and cfg.sliding_window is None
        if prefix is None and (simple_causal and (past == 0 or T == 1)):
            mask = None  # SDPA's causal path (prefill) or nothing to mask (one new token)
        elif prefix is None and not cfg.causal and attention_mask is None:
            mask = None
        else:
            query_index = torch.arange(past, past + T, device=position_ids.device).expand(position_ids.shape[0], T)
            mask = attention_mask_4d(query_index, attention_mask, num_keys, cfg.causal, cfg.sliding_window)
            if prefix is not None:
                mask = _prepend_visible(mask, prefix[0][0].shape[2], position_ids.shape[0], T, num_keys)
            mask = let_empty_rows_attend(mask)
        is_causal = cfg.causal and past == 0
        return AttentionInputs(cos, sin, mask, is_causal, cache, prefix, need_weights)

    def _head(self, x: torch.Tensor, attention_mask, logits_to_keep: int) -> torch.Tensor | None:
        task = self.config.task
        if task == "causal-lm":
            return self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)
        if task == "masked-lm":
            return self.mlm_head(x)
        if task in ("sequence-classification", "token-classification"):
            return self.classifier(x, attention_mask)
        return None

    # --- conveniences --------------------------------------------------------------------------------
    def num_parameters(self, trainable_only: bool = False) -> int:
        seen, total = set(), 0
        for p in self.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    @property
    def device(self) -> torch.device:
        # Not embed.tokens.weight: a quantized tied embedding would dequantize the whole table to answer.
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: that of the first floating-point parameter (float32 if none)."""
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)


def _prepend_visible(mask, num_prefix: int, B: int, T: int, num_keys: int) -> torch.Tensor:
    """Prefix-tuning keys are visible to every query: add True columns in front of the mask."""
    if mask is None:
        mask = torch.ones(B, 1, T, num_keys, dtype=torch.bool)
    mask = mask.expand(B, 1, T, num_keys)
    visible = torch.ones(B, 1, T, num_prefix, dtype=torch.bool, device=mask.device)
    return torch.cat((visible, mask), dim=-1)
