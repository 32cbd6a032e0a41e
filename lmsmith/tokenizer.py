"""Tokenizers: a thin wrapper over the `tokenizers` library plus chat templates.

Two sources are supported:

* an HF folder (`tokenizer.json` + `tokenizer_config.json` [+ `special_tokens_map.json`,
  `chat_template.jinja`, `generation_config.json`]), read with the same rules `transformers` uses, and
* a GGUF file, whose vocabulary llama.cpp stores as metadata (`tokenizer.ggml.*`); we rebuild the
  equivalent `tokenizers.Tokenizer` (byte-level BPE for `gpt2`, SentencePiece-style BPE for `llama`).

`Tokenizer.save` writes a folder `transformers.AutoTokenizer` loads and encodes identically.
"""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

if TYPE_CHECKING:
    from gguf import GGUFReader

# Markers chat templates use to close a turn; generation should stop on them as on EOS.
END_OF_TURN_MARKERS = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>",
    "<|endoftext|>", "<|end_of_text|>", "</s>",
)
SPECIAL_TOKEN_NAMES = ("bos", "eos", "pad", "unk", "mask", "cls", "sep")
# Above this, `model_max_length` is transformers' "no limit" sentinel (int(1e30)).
_NO_LIMIT = 10**12


@dataclass(frozen=True)
class SpecialTokens:
    """The named special tokens, as strings (None where the tokenizer has none)."""

    bos: str | None = None
    eos: str | None = None
    pad: str | None = None
    unk: str | None = None
    mask: str | None = None
    cls: str | None = None
    sep: str | None = None

    def as_config(self) -> dict[str, str]:
        """`{"bos_token": ..., ...}` for the tokens that are set (tokenizer_config.json keys)."""
        return {f"{f.name}_token": getattr(self, f.name) for f in fields(self) if getattr(self, f.name)}


class Tokenizer:
    """Text ↔ token ids, special tokens and chat templates over a `tokenizers.Tokenizer` backend.

    `add_bos_eos` = (add_bos, add_eos) rebuilds the post-processor from those flags (as transformers does
    when tokenizer_config.json states them); None keeps the backend's own post-processor.
    """

    # The `tokenizer.*` GGUF metadata this tokenizer was built from (None otherwise): a GGUF export
    # writes it back unchanged instead of re-deriving token types, pre-tokenizer name and scores.
    gguf_metadata: dict[str, Any] | None = None

    def __init__(
        self,
        backend: Backend,
        special: SpecialTokens = SpecialTokens(),
        *,
        chat_template: str | None = None,
        model_max_length: int | None = None,
        add_bos_eos: tuple[bool, bool] | None = None,
        extra_eos_ids: Iterable[int] = (),
        clean_up_spaces: bool = False,
    ) -> None:
        # Padding/truncation saved in tokenizer.json are per-call options in transformers, off by default.
        backend.no_padding()
        backend.no_truncation()
        self._backend = backend
        self.special = special
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self.clean_up_spaces = clean_up_spaces
        self._add_bos_eos = add_bos_eos
        if add_bos_eos is not None:
            backend.post_processor = _bos_eos_processor(self, *add_bos_eos)
        self._extra_eos_ids = frozenset(extra_eos_ids)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> Tokenizer:
        """Load an HF tokenizer folder (needs tokenizer.json; the other files are optional)."""
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {folder}")
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            present = sorted(p.name for p in folder.iterdir())
            raise FileNotFoundError(
                f"{folder} has no tokenizer.json (found: {present}); only `tokenizers` JSON files are "
                "supported, not sentencepiece .model or vocab.txt alone"
            )
        config = _read_json(folder / "tokenizer_config.json")
        special = _special_tokens_from_config(config, _read_json(folder / "special_tokens_map.json"))
        flags = None
        if "add_bos_token" in config or "add_eos_token" in config:
            flags = (bool(config.get("add_bos_token")), bool(config.get("add_eos_token")))
        return cls(
            Backend.from_file(str(tokenizer_file)),
            special,
            chat_template=_read_chat_template(folder, config),
            model_max_length=_max_length(config.get("model_max_length")),
            add_bos_eos=flags,
            extra_eos_ids=_generation_eos_ids(folder),
            clean_up_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        )

    @classmethod
    def from_gguf(cls, reader_or_path: GGUFReader | str | os.PathLike) -> Tokenizer:
        """Rebuild the tokenizer a GGUF file describes in its `tokenizer.*` metadata."""
        from .io.gguf import gguf_fields, open_gguf  # local: io.gguf imports this module

        is_path = isinstance(reader_or_path, (str, os.PathLike))
        reader = open_gguf(reader_or_path) if is_path else reader_or_path
        return tokenizer_from_gguf_metadata(gguf_fields(reader))

    # ---------------------------------------------------------------- encode / decode
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        text = self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self.clean_up_spaces else text

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    # ---------------------------------------------------------------- properties
    @property
    def backend(self) -> Backend:
        """The underlying `tokenizers.Tokenizer` (for batching/offsets; do not mutate)."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def _id_of(self, name: str) -> int | None:
        token = getattr(self.special, name)
        return None if token is None else self._backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._id_of("bos")

    @property
    def eos_id(self) -> int | None:
        return self._id_of("eos")

    @property
    def pad_id(self) -> int | None:
        return self._id_of("pad")

    @property
    def unk_id(self) -> int | None:
        return self._id_of("unk")

    @property
    def mask_id(self) -> int | None:
        return self._id_of("mask")

    @property
    def eos_ids(self) -> frozenset[int]:
        """Every id that should stop generation: EOS, generation_config's EOS ids, and the
        end-of-turn markers the chat template uses (e.g. `<|im_end|>`)."""
        ids = set(self._extra_eos_ids)
        if self.eos_id is not None:
            ids.add(self.eos_id)
        for marker in END_OF_TURN_MARKERS:
            if self.chat_template and marker in self.chat_template:
                token_id = self._backend.token_to_id(marker)
                if token_id is not None:
                    ids.add(token_id)
        return frozenset(ids)

    @property
    def adds_bos(self) -> bool:
        """Whether `encode(..., add_special_tokens=True)` starts with BOS."""
        ids = self.encode("", add_special_tokens=True)
        return bool(ids) and self.bos_id is not None and ids[0] == self.bos_id

    # ---------------------------------------------------------------- chat
    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render `messages` with the chat template, as transformers' `apply_chat_template(tokenize=False)`
        does; extra keyword arguments become template variables."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat_template; set Tokenizer.chat_template first")
        variables = {**self.special.as_config(), **template_kwargs}  # bos_token, eos_token, …
        try:
            return compile_chat_template(self.chat_template).render(
                messages=list(messages), tools=tools, documents=None,
                add_generation_prompt=add_generation_prompt, **variables,
            )
        except jinja2.TemplateError as err:  # raise_exception() in the template, or a template bug
            raise ValueError(f"chat template failed: {err}") from err

    # ---------------------------------------------------------------- save
    def save(self, folder: str | os.PathLike) -> Path:
        """Write tokenizer.json + tokenizer_config.json (loadable by `transformers.AutoTokenizer`)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(folder / "tokenizer.json"))
        config = json.dumps(self._config_dict(), indent=2, ensure_ascii=False)
        (folder / "tokenizer_config.json").write_text(config, encoding="utf-8")
        return folder

    def _config_dict(self) -> dict[str, Any]:
        # The generic class loads tokenizer.json as is; a model-specific one might rebuild pieces of it.
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special.as_config()}
        config["clean_up_tokenization_spaces"] = self.clean_up_spaces
        if self._add_bos_eos is not None:
            config["add_bos_token"], config["add_eos_token"] = self._add_bos_eos
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        if self.chat_template:
            config["chat_template"] = self.chat_template
        return config

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.special.bos!r}, eos={self.special.eos!r})"


# ==================================================================== streaming
class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns the new complete text (possibly "").

    Decodes a short window of recent ids and emits what the newest ids add to it, holding text back
    while it ends in U+FFFD (a multi-byte character split across tokens). The concatenation of all
    pushes and `flush()` equals `decode(all_ids)` for decoders that only append text at token
    boundaries (byte-level BPE, SentencePiece, WordPiece without punctuation clean-up).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: text before it was emitted long ago
        self._read_offset = 0  # text of ids[:read_offset] has been emitted

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        delta = self._pending_text()
        if not delta or delta.endswith("\ufffd"):
            return ""  # incomplete character (or nothing visible yet): wait for more ids
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return delta

    def flush(self) -> str:
        """Whatever is still held back (e.g. a truly invalid byte sequence at the very end)."""
        delta = self._pending_text()
        self._prefix_offset = self._read_offset = len(self._ids)
        return delta

    def _pending_text(self) -> str:
        decode = self._tokenizer.decode
        emitted = decode(self._ids[self._prefix_offset:self._read_offset], self._skip)
        window = decode(self._ids[self._prefix_offset:], self._skip)
        return window[len(emitted):] if len(window) > len(emitted) else ""


def clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization_spaces`: drop spaces before punctuation and contractions."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text


# ==================================================================== chat templates
class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}…{% endgeneration %}` marks assistant text for transformers' masks: render it."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@lru_cache(maxsize=32)
def compile_chat_template(source: str) -> jinja2.Template:
    """A sandboxed jinja2 template with the environment transformers gives chat templates."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


# ==================================================================== HF folder helpers
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def _token_content(value: Any) -> str | None:
    """Special tokens are saved as a string or as a serialized AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens_from_config(config: dict[str, Any], special_map: dict[str, Any]) -> SpecialTokens:
    def lookup(name: str) -> str | None:
        key = f"{name}_token"
        return _token_content(config.get(key)) or _token_content(special_map.get(key))

    return SpecialTokens(**{name: lookup(name) for name in SPECIAL_TOKEN_NAMES})


def _read_chat_template(folder: Path, config: dict[str, Any]) -> str | None:
    jinja_file = folder / "chat_template.jinja"  # where recent transformers versions save it
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # older format: named templates; "default" is the chat one
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default")
    return template


def _max_length(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and 0 < value < _NO_LIMIT else None


def _generation_eos_ids(folder: Path) -> list[int]:
    eos = _read_json(folder / "generation_config.json").get("eos_token_id")
    if eos is None:
        return []
    return [int(i) for i in eos] if isinstance(eos, list) else [int(eos)]


def _bos_eos_processor(tokenizer: Tokenizer, add_bos: bool, add_eos: bool) -> processors.TemplateProcessing:
    """transformers' `update_post_processor`: BOS/EOS around each sequence, skipping tokens it lacks."""
    bos, eos = tokenizer.special.bos, tokenizer.special.eos
    add_bos, add_eos = add_bos and tokenizer.bos_id is not None, add_eos and tokenizer.eos_id is not None
    single = f"{f'{bos}:0 ' if add_bos else ''}$A:0{f' {eos}:0' if add_eos else ''}"
    pair = f"{single}{f' {bos}:1' if add_bos else ''} $B:1{f' {eos}:1' if add_eos else ''}"
    special = ([(bos, tokenizer.bos_id)] if add_bos else []) + ([(eos, tokenizer.eos_id)] if add_eos else [])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


# ==================================================================== GGUF vocabularies
# llama.cpp token types (tokenizer.ggml.token_type)
_CONTROL, _USER_DEFINED = 3, 4
_GGUF_END_OF_TURN_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")

# Pre-tokenizer split regexes by `tokenizer.ggml.pre`, copied from llama.cpp's llama-vocab.cpp.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_pre() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_pre() -> pre_tokenizers.PreTokenizer:
    # llama.cpp splits every digit first ("\p{N}"), then applies the GPT-2 regex (SmolLM, StarCoder).
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_pre()])


def _regex_pre(pattern: str):
    def build() -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    return build


BYTE_LEVEL_PRE_TOKENIZERS = {
    "default": _gpt2_pre, "gpt2": _gpt2_pre,
    "smollm": _digits_then_gpt2_pre, "starcoder": _digits_then_gpt2_pre, "refact": _digits_then_gpt2_pre,
    "llama3": _regex_pre(_LLAMA3_SPLIT), "llama-v3": _regex_pre(_LLAMA3_SPLIT),
    "llama-bpe": _regex_pre(_LLAMA3_SPLIT), "smaug-bpe": _regex_pre(_LLAMA3_SPLIT),
    "falcon3": _regex_pre(_LLAMA3_SPLIT), "dbrx": _regex_pre(_LLAMA3_SPLIT),
    "qwen2": _regex_pre(_QWEN2_SPLIT), "deepseek-r1-qwen": _regex_pre(_QWEN2_SPLIT),
    "gpt-4o": _regex_pre(_GPT4O_SPLIT), "llama4": _regex_pre(_GPT4O_SPLIT),
}


def _byte_level_backend(meta: dict[str, Any]) -> Backend:
    """`tokenizer.ggml.model == "gpt2"`: tokens are already spelled in GPT-2's byte alphabet."""
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    backend = Backend(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    pre = meta.get("tokenizer.ggml.pre") or "default"
    if pre not in BYTE_LEVEL_PRE_TOKENIZERS:
        warnings.warn(f"GGUF pre-tokenizer {pre!r} is not known; splitting text with the GPT-2 regex "
                      f"(known: {sorted(BYTE_LEVEL_PRE_TOKENIZERS)})", stacklevel=3)
    backend.pre_tokenizer = BYTE_LEVEL_PRE_TOKENIZERS.get(pre, _gpt2_pre)()
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(meta: dict[str, Any]) -> Backend:
    """`tokenizer.ggml.model == "llama"`: SentencePiece BPE with byte fallback, `▁` for spaces."""
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    else:
        merges = merges_from_scores(tokens, meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_prefix else []))
    return backend


def merges_from_scores(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """Recover BPE merges from a SentencePiece vocabulary: every split of a token into two vocabulary
    pieces is a merge, ranked by the merged token's score (higher first), as transformers does."""
    vocab = {t: i for i, t in enumerate(tokens)}
    candidates = []
    for token, score in zip(tokens, scores):
        splits = ((token[:k], token[k:]) for k in range(1, len(token)))
        pairs = [(left, right) for left, right in splits if left in vocab and right in vocab]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        candidates.extend((left, right, score) for left, right in pairs)
    candidates.sort(key=lambda c: (c[2], len(c[0]), len(c[1])), reverse=True)
    return [(left, right) for left, right, _ in candidates]


GGUF_TOKENIZER_MODELS = {"gpt2": _byte_level_backend, "llama": _sentencepiece_backend}


def _add_gguf_added_tokens(backend: Backend, tokens: Sequence[str], token_types: Sequence[int]) -> None:
    """Control tokens become special (matched whole, skippable on decode); user-defined ones are
    matched whole but decoded like text. Both keep their vocabulary ids."""
    control = [AddedToken(t, special=True, normalized=False)
               for t, kind in zip(tokens, token_types) if kind == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, token_types) if kind == _USER_DEFINED]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)


def _gguf_special_tokens(meta: dict[str, Any]) -> SpecialTokens:
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    return SpecialTokens(
        bos=token("bos"), eos=token("eos"), pad=token("padding"), unk=token("unknown"),
        mask=token("mask"), sep=token("seperator"),  # sic: llama.cpp's key spelling
    )


def tokenizer_from_gguf_metadata(meta: dict[str, Any]) -> Tokenizer:
    """Build a Tokenizer from a GGUF file's parsed metadata (`tokenizer.*` keys, plain Python values)."""
    model = meta.get("tokenizer.ggml.model")
    if model is None or "tokenizer.ggml.tokens" not in meta:
        raise ValueError("GGUF metadata has no tokenizer (no tokenizer.ggml.model or tokenizer.ggml.tokens)")
    if model not in GGUF_TOKENIZER_MODELS:
        raise NotImplementedError(
            f"GGUF tokenizer model {model!r} is not supported; supported: {sorted(GGUF_TOKENIZER_MODELS)}"
        )
    backend = GGUF_TOKENIZER_MODELS[model](meta)
    tokens = meta["tokenizer.ggml.tokens"]
    _add_gguf_added_tokens(backend, tokens, meta.get("tokenizer.ggml.token_type") or [])
    # llama.cpp adds BOS for SentencePiece vocabularies unless the file says otherwise.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    template = meta.get("tokenizer.chat_template")
    tokenizer = Tokenizer(
        backend, _gguf_special_tokens(meta), chat_template=template if isinstance(template, str) else None,
        model_max_length=meta.get(f"{meta.get('general.architecture')}.context_length"),
        add_bos_eos=(add_bos, add_eos),
        # llama.cpp also ends generation on the end-of-turn / end-of-message tokens.
        extra_eos_ids=[meta[k] for k in _GGUF_END_OF_TURN_KEYS if k in meta],
    )
    tokenizer.gguf_metadata = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
    return tokenizer
