"""`lmsmith <verb>`: a table of verbs, each mapped to one library function. No logic lives here."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable


def _generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto (a GPU when CUDA is available), cpu, cuda or cuda:N")


def _gen_kwargs(a: argparse.Namespace) -> dict:
    return {"max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p,
                "min_p": a.min_p, "repetition_penalty": a.repetition_penalty, "stop": tuple(a.stop), "seed": a.seed}


def _print_json(result) -> None:
    print(json.dumps(result, indent=2, default=str))


def _print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for key in rows[0]:
        table.add_column(key)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    Console(width=max(Console().width, 160)).print(table)


# --- verbs ----------------------------------------------------------------------------------------------
def _models(a):
    from .embedded import list_assets
    _print_table(list_assets())


def _info(a):
    from .api import info
    _print_json(info(a.model))


def _generate(a):
    from .interactive import generate_cli
    generate_cli(a.prompt, a.model, chat=a.chat, device=a.device, **_gen_kwargs(a))


def _chat(a):
    from .interactive import chat_repl
    chat_repl(a.model, system=a.system, device=a.device, **_gen_kwargs(a))


def _setup_generate(p):
    p.add_argument("prompt")
    p.add_argument("--model", default=None, help="embedded name, GGUF file or model folder")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    _generation_args(p)


def _setup_chat(p):
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--system", default=None)
    _generation_args(p)


def _setup_model(p):
    p.add_argument("model", nargs="?", default=None)


VERBS: dict[str, tuple[str, Callable, Callable]] = {
    "models": ("list the embedded models and data sets", lambda p: None, _models),
    "info": ("family, parameters, size and context length of a model", _setup_model, _info),
    "generate": ("complete a prompt, streaming", _setup_generate, _generate),
    "chat": ("interactive streaming chat", _setup_chat, _chat),
}


def _all_verbs() -> dict[str, tuple[str, Callable, Callable]]:
    """Our verbs plus those each area declares next to its code (their imports stay lazy)."""
    from .compress.cli_verbs import VERBS as compress_verbs
    from .evaluate.cli_verbs import VERBS as evaluate_verbs
    from .explain.cli_verbs import VERBS as explain_verbs
    from .robustness.cli_verbs import VERBS as robustness_verbs
    from .serve.cli_verbs import VERBS as serve_verbs
    from .train.cli_verbs import VERBS as train_verbs

    return {**VERBS, **train_verbs, **compress_verbs, **evaluate_verbs, **explain_verbs, **robustness_verbs, **serve_verbs}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmsmith", description="Build, adapt, compress, check and serve language models.")
    sub = parser.add_subparsers(dest="verb", required=True)
    for name, (help_text, setup, run) in _all_verbs().items():
        p = sub.add_parser(name, help=help_text)
        setup(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"lmsmith {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
