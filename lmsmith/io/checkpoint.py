"""HF model folders in and out: config.json ↔ ModelConfig, (sharded) safetensors ↔ our state dict."""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..model.config import ModelConfig
from ..model.families import config_from_hf, config_to_hf
from ..model.transformer import Transformer
from .weights import CheckpointError, to_ours, to_theirs

log = logging.getLogger(__name__)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Buffers some checkpoints carry that we recompute instead of loading.
_IGNORABLE = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias", "attention.bias", "attention.masked_bias",
              "embeddings.position_ids",
              # T5: copies of the shared embedding, and a cross-attention position table T5 never uses
              "encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
              "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder} has no config.json (is it an HF model folder?)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e


def weight_files(folder: Path, allow_pickle: bool = False) -> list[Path]:
    """The safetensors files of a folder (single or sharded via its index); pickles refused."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).exists()]
        if missing:
            raise CheckpointError(f"{index}: shard files missing: {missing}")
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles and not allow_pickle:
        raise CheckpointError(
            f"{folder} only has pickled weights {pickles}; pickles can run arbitrary code when loaded, so lmsmith "
            "refuses them. Convert to safetensors, or pass allow_pickle=True if you trust the file."
        )
    if pickles:
        return [folder / p for p in pickles]
    raise FileNotFoundError(f"{folder} has no model.safetensors (or sharded index)")


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        if path.suffix in PICKLE_SUFFIXES:  # only reached with allow_pickle=True
            tensors.update(torch.load(path, map_location="cpu", weights_only=True))
            continue
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    tensors[name] = f.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{path}: cannot read safetensors file (corrupt or truncated?): {e}") from e
    return tensors


def build_model(config: ModelConfig, tensors: dict[str, torch.Tensor], source: str,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Transformer:
    """Create the model without random init and fill every parameter from `tensors` (HF names)."""
    with torch.device("meta"), _skip_random_init():
        model = Transformer(config)
    wanted = {k for k in model.state_dict() if not _is_tied_copy(config, k)}
    state, unused = to_ours(tensors, config, wanted, source)
    unused = {n for n in unused if not n.endswith(_IGNORABLE)}
    if unused:
        log.warning("%s: %d tensors not used by a %s model, e.g. %s", source, len(unused), config.task,
                    sorted(unused)[:5])
    expected = model.state_dict()
    for name, t in state.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{source}: tensor for {name!r} has shape {tuple(t.shape)}, config expects {tuple(expected[name].shape)}"
            )
    # assign=True adopts the loaded tensors instead of copying them: no second copy of the weights.
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=False, assign=True)
    model.reset_buffers()
    still_meta = [n for n, t in model.state_dict().items() if t.is_meta]
    assert not still_meta, f"parameters left unloaded: {still_meta[:5]}"
    return model


@contextmanager
def _skip_random_init():
    """Make torch.nn.init a no-op while building a model whose weights come from a checkpoint.

    On the meta device there is nothing to initialise, and random init there goes through
    torch._refs, which imports torch._dynamo: seconds added to every first load.
    """
    names = ("normal_", "uniform_", "kaiming_uniform_", "xavier_uniform_", "trunc_normal_", "ones_", "zeros_")
    saved = {name: getattr(nn.init, name) for name in names}
    try:
        for name in names:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def _is_tied_copy(config: ModelConfig, key: str) -> bool:
    return config.tie_word_embeddings and key in ("lm_head.weight", "mlm_head.decoder.weight")


def load_hf_folder(path: str | os.PathLike, task: str | None = None, labels: tuple[str, ...] | None = None,
                   dtype: torch.dtype = torch.float32, device="cpu", allow_pickle: bool = False) -> Transformer:
    folder = Path(path)
    config = config_from_hf(read_config(folder), task=task, labels=labels)
    tensors = read_tensors(weight_files(folder, allow_pickle))
    return build_model(config, tensors, str(folder), dtype, device)


def save_hf_folder(model: Transformer, path: str | os.PathLike, tokenizer=None, extra_files: dict | None = None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer) atomically: a temp folder renamed into place."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        config = config_to_hf(model.config)
        config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        save_file(to_theirs(state, model.config), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def replace_dir(new: Path, target: Path) -> None:
    """Swap `new` into `target`; the old folder survives until the new one is in place."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
        os.rename(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, target)
