"""Pure tensor functions the layers are made of: norms, RoPE, relative position buckets, masks, attention."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import RopeScaling

_CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

ACTIVATION_FNS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32 like the reference implementations, so bf16 runs match them.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


# --- rotary position embeddings -------------------------------------------------------------------
def rope_inv_freq(rotary_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """Inverse frequencies (rotary_dim // 2,), with the checkpoint's scaling applied."""
    # Always computed on the CPU: under a meta-device context torch.arange would import torch._dynamo
    # (seconds at start-up) and produce nothing usable anyway.
    steps = torch.arange(0, rotary_dim, 2, dtype=torch.float64, device="cpu")
    inv_freq = 1.0 / theta ** (steps / rotary_dim)
    if scaling is None or scaling.kind == "dynamic":
        return inv_freq.float()
    if scaling.kind == "linear":
        return (inv_freq / scaling.factor).float()
    if scaling.kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling).float()
    if scaling.kind == "yarn":
        return _yarn_inv_freq(inv_freq, rotary_dim, theta, scaling).float()
    raise ValueError(f"unsupported rope scaling {scaling.kind!r}")


def _llama3_inv_freq(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    # Llama 3.1: keep high frequencies, divide low ones by factor, interpolate in between.
    old_len = s.original_max_position_embeddings or 8192
    low_wavelen, high_wavelen = old_len / s.low_freq_factor, old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(inv_freq: torch.Tensor, dim: int, theta: float, s: RopeScaling) -> torch.Tensor:
    old_len = s.original_max_position_embeddings or 4096

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(s.beta_fast)), 0)
    high = min(math.ceil(correction_dim(s.beta_slow)), dim - 1)
    ramp = (torch.arange(dim // 2, dtype=torch.float64, device="cpu") - low) / max(high - low, 1e-3)
    extrapolation = 1 - ramp.clamp(0, 1)
    return inv_freq / s.factor * (1 - extrapolation) + inv_freq * extrapolation


def rope_attention_factor(scaling: RopeScaling | None) -> float:
    """YaRN scales cos/sin so attention entropy stays put; 1 for every other scheme."""
    if scaling is None or scaling.kind != "yarn":
        return 1.0
    return 0.1 * math.log(scaling.factor) + 1.0


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, factor: float = 1.0):
    """cos/sin tables for (…, T) integer positions → (…, T, rotary_dim)."""
    angles = positions.to(inv_freq.dtype).unsqueeze(-1) * inv_freq  # (…, T, rd/2)
    angles = torch.cat((angles, angles), dim=-1)  # (…, T, rd): HF's half-split layout
    return angles.cos() * factor, angles.sin() * factor


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] features of each head; x: (B, H, T, D), cos/sin: (B, T, rd)."""
    rd = cos.shape[-1]
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)  # (B, 1, T, rd)
    if rd == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, keep = x[..., :rd], x[..., rd:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, keep), dim=-1)


# --- relative position buckets (T5) ----------------------------------------------------------------------
def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """Map key_position - query_position to a bucket in [0, num_buckets), as T5 (Mesh TensorFlow) does.

    Bidirectional (encoder): half the buckets for keys after the query, half for keys before it.
    Unidirectional (decoder): keys after the query all share bucket 0 (they are masked anyway).
    Within a direction, the first half of the buckets are exact distances and the rest are
    log-spaced up to `max_distance`; farther keys share the last bucket.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    # Same float32 op order as the reference, so a distance on a bucket edge lands in the same bucket.
    # Clamped so log never sees 0; the exact branch answers for those distances anyway.
    scaled = torch.log(distance.clamp(min=max_exact).float() / max_exact) / math.log(max_distance / max_exact)
    far = (max_exact + (scaled * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, far)


def relative_position_bias(
    table: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    bidirectional: bool,
    max_distance: int,
) -> torch.Tensor:
    """Per-head additive attention scores (1, H, T, S) from a (num_buckets, H) bias table."""
    relative = key_positions.view(1, -1) - query_positions.view(-1, 1)  # (T, S)
    buckets = relative_position_bucket(relative, bidirectional, table.shape[0], max_distance)
    return F.embedding(buckets, table).permute(2, 0, 1).unsqueeze(0)


def add_score_bias(mask: torch.Tensor | None, bias: torch.Tensor) -> torch.Tensor:
    """Fold a boolean mask (True = may attend) into an additive float bias for SDPA.

    The mask must leave every row at least one key (`let_empty_rows_attend`), or that row is NaN.
    """
    if mask is None:
        return bias
    return bias.masked_fill(~mask, float("-inf"))


# --- masks -------------------------------------------------------------------------------------------
def attention_mask_4d(
    query_positions: torch.Tensor,
    key_padding: torch.Tensor | None,
    num_keys: int,
    causal: bool,
    sliding_window: int | None = None,
) -> torch.Tensor | None:
    """Boolean mask (B, 1, T, S), True where a query may attend; None when nothing is masked.

    query_positions: (B, T) absolute positions of the queries; keys sit at positions 0..S-1.
    key_padding: (B, S) with 1 for real tokens and 0 for padding.
    """
    mask = None
    if causal:
        keys = torch.arange(num_keys, device=query_positions.device)
        mask = keys.view(1, 1, -1) <= query_positions.unsqueeze(-1)  # (B, T, S)
        if sliding_window is not None:
            mask = mask & (keys.view(1, 1, -1) > query_positions.unsqueeze(-1) - sliding_window)
        mask = mask.unsqueeze(1)
    if key_padding is not None:
        pad = key_padding[:, None, None, :].bool()
        mask = pad if mask is None else mask & pad
    return mask


def let_empty_rows_attend(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A fully masked row (a padding query) would make SDPA return NaN; let it attend everywhere
    instead (its output is never used). Done once per forward, not once per layer."""
    if mask is None:
        return None
    return mask | ~mask.any(-1, keepdim=True)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    dropout: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """SDPA over (B, H, T, D) queries and (B, Hkv, S, D) keys/values (grouped-query aware).

    `mask` is boolean (True = may attend) or an additive float bias; it must give every query at
    least one key (see `let_empty_rows_attend`), or its row is NaN. `scale` None: 1/sqrt(D).
    """
    # enable_gqa lets SDPA share each KV head across its query group without copying K/V.
    kwargs = {"attn_mask": mask, "dropout_p": dropout, "is_causal": is_causal and mask is None,
              "enable_gqa": k.shape[1] != q.shape[1], "scale": scale}
    if q.is_cuda:
        # cuDNN attention (SDPA's first choice for bf16 on Hopper) builds a graph per new key length:
        # measured 1.3 ms of CPU per call on an H200, which made bf16 decoding 4x slower than fp32.
        with sdpa_kernel(_CUDA_SDPA_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                      scale: float | None = None):
    """Explicit softmax(QK^T * scale + bias) for interpretability: (B, H, T, S); scale None: 1/sqrt(d)."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = q @ k.transpose(-1, -2)
    scores = scores / math.sqrt(q.shape[-1]) if scale is None else scores * scale
    if mask is None and is_causal:
        T, S = q.shape[-2], k.shape[-2]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None and mask.dtype != torch.bool:
        scores = scores + mask
    elif mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.float().softmax(-1).to(q.dtype)
