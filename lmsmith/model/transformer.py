"""The one generic Transformer: every family is a ModelConfig, never a new forward pass.

Decoder-only and encoder-only models are embeddings → `layers` → `norm` → head. Encoder-decoder
models (T5) compose two stacks of the same Block: `encoder` (bidirectional) and `decoder` (causal,
each block adding cross-attention over the encoder output), sharing the token embeddings and head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention, AttentionInputs, KVCache
from .config import ModelConfig
from .heads import MaskedLMHead, SequenceClassifier, TokenClassifier
from .layers import MLP, Embeddings, make_norm
from .ops import (
    add_score_bias,
    attention_mask_4d,
    let_empty_rows_attend,
    relative_position_bias,
    rope_attention_factor,
    rope_cos_sin,
    rope_inv_freq,
)

LM_TASKS = ("causal-lm", "seq2seq-lm")  # tasks whose head is `lm_head`


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # task output; None for task="base"
    hidden_states: torch.Tensor  # final hidden states (B, T, H); encoder-decoder: the decoder's
    all_hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings + every layer (enc-dec: encoder's)
    attentions: tuple[torch.Tensor, ...] | None = None  # per layer (B, H, T, S) (enc-dec: encoder self-attention)
    # encoder-decoder only
    encoder_hidden_states: torch.Tensor | None = None  # the encoder output (B, S_enc, H) this call attended to
    decoder_all_hidden_states: tuple[torch.Tensor, ...] | None = None  # decoder embeddings + every decoder layer
    decoder_attentions: tuple[torch.Tensor, ...] | None = None  # per decoder layer (B, H, T, S_dec)
    cross_attentions: tuple[torch.Tensor, ...] | None = None  # per decoder layer (B, H, T, S_enc)


class Block(nn.Module):
    """Self-attention (+ cross-attention over encoder states in a decoder stack) + MLP, with residuals."""

    def __init__(self, config: ModelConfig, layer_idx: int, cross_attention: bool = False):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer_idx, relative_bias=config.position == "relative" and layer_idx == 0)
        if cross_attention:
            self.cross_attn_norm = make_norm(config)
            self.cross_attn = Attention(config, layer_idx)
        else:
            self.cross_attn = None
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.post_norm = config.norm_position == "post"
        self.parallel = config.parallel_residual

    def forward(self, x: torch.Tensor, inp: AttentionInputs, cross: AttentionInputs | None = None):
        """→ (output, self-attention weights), plus cross-attention weights when `cross` is given."""
        if cross is not None:
            return self._forward_with_cross(x, inp, cross)
        if self.post_norm:  # BERT: normalise after each residual sum
            a, w = self.attn(x, inp)
            h = self.attn_norm(x + self.dropout(a))
            return self.mlp_norm(h + self.dropout(self.mlp(h))), w
        a, w = self.attn(self.attn_norm(x), inp)
        if self.parallel:  # GPT-NeoX: attention and MLP both read the block input
            return x + self.dropout(a) + self.dropout(self.mlp(self.mlp_norm(x))), w
        h = x + self.dropout(a)
        return h + self.dropout(self.mlp(self.mlp_norm(h))), w

    def _forward_with_cross(self, x: torch.Tensor, inp: AttentionInputs, cross: AttentionInputs):
        # Pre-norm sublayers in T5's order: self-attention, cross-attention, MLP.
        a, w = self.attn(self.attn_norm(x), inp)
        h = x + self.dropout(a)
        c, cw = self.cross_attn(self.cross_attn_norm(h), cross)
        h = h + self.dropout(c)
        return h + self.dropout(self.mlp(self.mlp_norm(h))), w, cw


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, inp: AttentionInputs, cross: AttentionInputs | None = None,
               checkpointing: bool = False):
    """Run the blocks in order → (x, hidden states [input + every block], weights, cross weights)."""
    hidden, weights, cross_weights = [x], [], []
    args = () if cross is None else (cross,)
    for block in blocks:
        out = checkpoint(block, x, inp, *args, use_reentrant=False) if checkpointing else block(x, inp, *args)
        x = out[0]
        hidden.append(x)
        weights.append(out[1])
        if cross is not None:
            cross_weights.append(out[2])
    return x, hidden, weights, cross_weights


class Stack(nn.Module):
    """Blocks plus a final norm: the encoder or the decoder of an encoder-decoder model."""

    def __init__(self, config: ModelConfig, num_layers: int, causal: bool, cross_attention: bool = False):
        super().__init__()
        self.causal = causal
        self.layers = nn.ModuleList(Block(config, i, cross_attention) for i in range(num_layers))
        self.norm = make_norm(config) if config.final_norm else None
        self.dropout = nn.Dropout(config.final_dropout) if config.final_dropout > 0 else None

    def forward(self, x: torch.Tensor, inp: AttentionInputs, cross: AttentionInputs | None = None,
                checkpointing: bool = False):
        x, hidden, weights, cross_weights = run_blocks(self.layers, x, inp, cross, checkpointing)
        if self.norm is not None:
            x = self.norm(x)
            hidden[-1] = x
        if self.dropout is not None:
            x = self.dropout(x)
        return x, hidden, weights, cross_weights


class Transformer(nn.Module):
    """Embeddings → blocks → final norm → the task head named by `config.task`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        _check_supported_layout(config)
        self.embed = Embeddings(config)
        if config.encoder_decoder:
            self.encoder = Stack(config, config.num_layers, causal=False)
            self.decoder = Stack(config, config.decoder_layers, causal=config.causal, cross_attention=True)
        else:
            self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
            self.norm = make_norm(config) if config.final_norm else None
        self._build_head(config)
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
        if config.task in LM_TASKS:
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
        if self.config.task in LM_TASKS:
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
        input_ids: torch.Tensor | None = None,  # (B, T); encoder-decoder: the encoder input (B, S_enc)
        attention_mask: torch.Tensor | None = None,  # (B, S) 1 = real token, over cached + new keys
        position_ids: torch.Tensor | None = None,  # (B, T)
        token_type_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        prefix: tuple[torch.Tensor, ...] | None = None,
        logits_to_keep: int = 0,  # >0: only the last n positions get logits (saves the vocab matmul)
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        # encoder-decoder only (see `_forward_seq2seq`)
        decoder_input_ids: torch.Tensor | None = None,  # (B, T_dec)
        decoder_attention_mask: torch.Tensor | None = None,  # (B, S_dec) over cached + new decoder tokens
        encoder_hidden_states: torch.Tensor | None = None,  # (B, S_enc, H) from `encode`, instead of input_ids
    ) -> ModelOutput:
        if self.config.encoder_decoder:
            if prefix is not None or position_ids is not None or token_type_ids is not None:
                raise ValueError("an encoder-decoder model takes no prefix, position_ids or token_type_ids "
                                 "(positions enter as relative biases)")
            return self._forward_seq2seq(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
                                         encoder_hidden_states, cache, logits_to_keep, output_hidden_states,
                                         output_attentions)
        if input_ids is None or decoder_input_ids is not None or encoder_hidden_states is not None:
            raise ValueError(f"a {self.config.family} {self.config.task} model needs input_ids; decoder_input_ids "
                             "and encoder_hidden_states are for encoder-decoder models")
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
        x, hidden, weights, _ = run_blocks(self.layers, x, inp, None, self._checkpointing)
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

    @property
    def _checkpointing(self) -> bool:
        return self.activation_checkpointing and self.training

    # --- encoder-decoder ---------------------------------------------------------------------------------
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               output_hidden_states: bool = False, output_attentions: bool = False) -> ModelOutput:
        """Run the encoder stack of an encoder-decoder model; `hidden_states` is its output (B, S, H)."""
        if not self.config.encoder_decoder:
            raise ValueError(f"encode() is for encoder-decoder models; this {self.config.family} model has none")
        B, T = input_ids.shape
        self._check_length("encoder input", T)
        inp = self._stack_inputs(self.encoder, input_ids.device, T, 0, attention_mask, None, output_attentions)
        x = self.embed(input_ids, torch.arange(T, device=input_ids.device).expand(B, T))
        x, hidden, weights, _ = self.encoder(x, inp, None, self._checkpointing)
        return ModelOutput(None, x, tuple(hidden) if output_hidden_states else None,
                           tuple(weights) if output_attentions else None)

    def _forward_seq2seq(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
                         encoder_hidden_states, cache, logits_to_keep, output_hidden_states, output_attentions):
        """Encode (unless the cache or `encoder_hidden_states` already hold it), then decode.

        With an `EncoderDecoderCache`, the first call encodes `input_ids` and stores the cross-attention
        keys/values; later calls pass only the new `decoder_input_ids`.
        """
        if decoder_input_ids is None:
            raise ValueError("an encoder-decoder model needs decoder_input_ids (generation starts them with "
                             f"decoder_start_token_id={self.config.decoder_start_token_id})")
        encoded, memory_kv, memory_mask = self._memory(input_ids, attention_mask, encoder_hidden_states, cache,
                                                       output_hidden_states, output_attentions)
        B, T = decoder_input_ids.shape
        past = getattr(cache, "length", 0) if cache is not None else 0
        self._check_length("decoder sequence", past + T)
        device = decoder_input_ids.device
        inp = self._stack_inputs(self.decoder, device, T, past, decoder_attention_mask, cache, output_attentions)
        cross = AttentionInputs(None, None, memory_mask, False, need_weights=output_attentions, memory_kv=memory_kv)
        x = self.embed(decoder_input_ids, torch.arange(past, past + T, device=device).expand(B, T))
        x, hidden, weights, cross_weights = self.decoder(x, inp, cross, self._checkpointing)
        if cache is not None and hasattr(cache, "advance"):
            cache.advance(T)
        return ModelOutput(
            logits=self._head(x, decoder_attention_mask, logits_to_keep), hidden_states=x,
            all_hidden_states=encoded.all_hidden_states if encoded else None,
            attentions=encoded.attentions if encoded else None,
            encoder_hidden_states=encoded.hidden_states if encoded else encoder_hidden_states,
            decoder_all_hidden_states=tuple(hidden) if output_hidden_states else None,
            decoder_attentions=tuple(weights) if output_attentions else None,
            cross_attentions=tuple(cross_weights) if output_attentions else None,
        )

    def _memory(self, input_ids, attention_mask, encoder_hidden_states, cache, output_hidden_states,
                output_attentions):
        """→ (this call's encoder output or None, per-layer cross-attention (k, v), encoder padding mask)."""
        if getattr(cache, "memory_kv", None) is not None:
            if input_ids is not None or encoder_hidden_states is not None:
                raise ValueError("the cache already holds an encoded input: later steps pass only "
                                 "decoder_input_ids (start a new cache for a new input)")
            return None, cache.memory_kv, cache.memory_mask
        encoded = None
        if encoder_hidden_states is None:
            if input_ids is None:
                raise ValueError("an encoder-decoder model needs input_ids (or encoder_hidden_states) to attend to")
            encoded = self.encode(input_ids, attention_mask, output_hidden_states, output_attentions)
            encoder_hidden_states = encoded.hidden_states
        memory_kv = [block.cross_attn.project_memory(encoder_hidden_states) for block in self.decoder.layers]
        mask = None if attention_mask is None else let_empty_rows_attend(attention_mask[:, None, None, :].bool())
        if cache is not None and hasattr(cache, "memory_kv"):
            cache.memory_kv, cache.memory_mask = memory_kv, mask
        return encoded, memory_kv, mask

    def _stack_inputs(self, stack: Stack, device, T: int, past: int, key_padding, cache, need_weights):
        """Mask (+ T5's relative position bias, shared by every layer of the stack) for T new queries."""
        queries = torch.arange(past, past + T, device=device)
        mask = None
        if (stack.causal and T > 1) or key_padding is not None:
            mask = attention_mask_4d(queries.view(1, T), key_padding, past + T, stack.causal)
            mask = let_empty_rows_attend(mask)
        table = stack.layers[0].attn.relative_bias
        if table is not None:
            keys = torch.arange(past + T, device=device)
            bias = relative_position_bias(table.weight, queries, keys, not stack.causal,
                                          self.config.relative_max_distance)
            mask = add_score_bias(mask, bias)
        return AttentionInputs(None, None, mask, False, cache, None, need_weights)

    def _check_length(self, what: str, num_tokens: int) -> None:
        if num_tokens > self.config.max_position_embeddings:
            raise ValueError(f"{what} of {num_tokens} tokens exceeds the context window of "
                             f"{self.config.max_position_embeddings} tokens")

    def _head(self, x: torch.Tensor, attention_mask, logits_to_keep: int) -> torch.Tensor | None:
        task = self.config.task
        if task == "causal-lm":
            return self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)
        if task == "seq2seq-lm":
            x = x[:, -logits_to_keep:] if logits_to_keep else x
            # Original T5 ties lm_head to the embeddings and rescales its input by hidden_size**-0.5.
            return self.lm_head(x * self.config.hidden_size ** -0.5 if self.config.scale_lm_head_input else x)
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


def _check_supported_layout(config: ModelConfig) -> None:
    if config.position == "relative" and not config.encoder_decoder:
        raise NotImplementedError("relative position buckets are implemented for encoder-decoder models (T5) only")
    if config.encoder_decoder and config.position == "rope":
        raise NotImplementedError("encoder-decoder models support position 'relative', 'learned' or 'none', "
                                  "not 'rope'")


def _prepend_visible(mask, num_prefix: int, B: int, T: int, num_keys: int) -> torch.Tensor:
    """Prefix-tuning keys are visible to every query: add True columns in front of the mask."""
    if mask is None:
        mask = torch.ones(B, 1, T, num_keys, dtype=torch.bool)
    mask = mask.expand(B, 1, T, num_keys)
    visible = torch.ones(B, 1, T, num_prefix, dtype=torch.bool, device=mask.device)
    return torch.cat((visible, mask), dim=-1)
