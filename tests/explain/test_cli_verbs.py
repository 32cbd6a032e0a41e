"""`lmsmith explain` through the verb table: files written, a readable summary, errors for bad input."""
from __future__ import annotations

import json

import pytest

from lmsmith.cli import build_parser
from lmsmith.explain.cli_verbs import VERBS
from lmsmith.io.artifact import save_artifact


@pytest.fixture(scope="module")
def classifier_folder(classifier, wp_tokenizer, tmp_path_factory):
    return save_artifact(classifier, tmp_path_factory.mktemp("clf") / "model", tokenizer=wp_tokenizer)


def _run(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


def test_verb_table_shape():
    assert set(VERBS) == {"explain"}
    help_text, setup, run = VERBS["explain"]
    assert isinstance(help_text, str) and callable(setup) and callable(run)


def test_explain_writes_files_and_prints_the_top_words(classifier_folder, tmp_path, capsys):
    out = tmp_path / "out"
    _run(["explain", str(classifier_folder), "I hate the movie, unbelievably bad!", "--method", "occlusion",
          "--target", "neg", "--out", str(out)])
    printed = capsys.readouterr().out
    assert printed.startswith("prediction: ") and "explaining: log-prob of 'neg'" in printed
    assert "supports:" in printed and "opposes:" in printed and str(out / "explanation.html") in printed
    data = json.loads((out / "explanation.json").read_text())
    assert data["method"] == "occlusion" and data["target"] == "neg" and data["unit"] == "word"
    assert "unbelievably" in data["tokens"]  # pieces merged by default
    assert (out / "explanation.png").stat().st_size > 1000 and (out / "explanation.html").is_file()


def test_ig_with_steps_and_token_pieces(classifier_folder, tmp_path, capsys):
    _run(["explain", str(classifier_folder), "unbelievably good", "--steps", "8", "--tokens",
          "--out", str(tmp_path)])
    data = json.loads((tmp_path / "explanation.json").read_text())
    assert data["method"] == "integrated-gradients" and data["n_steps"] == 8 and "##ably" in data["tokens"]
    assert data["completeness_gap"] is not None and "completeness gap" in capsys.readouterr().out


def test_attention_method_draws_a_layer(classifier_folder, tmp_path, capsys):
    _run(["explain", str(classifier_folder), "the movie was great", "--method", "attention", "--layer", "1",
          "--head", "0", "--out", str(tmp_path)])
    assert capsys.readouterr().out.startswith("layer 1, token '[CLS]' attends most to:")
    assert {p.name for p in tmp_path.iterdir()} == {"attention.png", "attention.html", "attention.json"}


@pytest.mark.parametrize("extra, match", [
    (["--method", "shap"], r"unknown method 'shap'; choose one of"),
    (["--target", "meh"], r"labels are \['neg', 'pos'\]"),
    (["--method", "attention", "--layer", "9"], r"captured layers are \[0, 1\]"),
])
def test_bad_options_raise_value_errors_naming_the_choices(classifier_folder, tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        _run(["explain", str(classifier_folder), "good movie", "--out", str(tmp_path), *extra])


def test_empty_text_is_a_clear_error(classifier_folder, tmp_path):
    with pytest.raises(ValueError, match="non-empty string"):
        _run(["explain", str(classifier_folder), " ", "--out", str(tmp_path)])
