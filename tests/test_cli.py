"""The CLI as a user calls it: verbs, output, exit codes and error messages."""
import json

import pytest

from lmsmith.cli import main


def test_models_lists_the_embedded_defaults(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "minilm-l6" in out and "tweets-sentiment" in out


def test_info_reports_family_parameters_and_context(tiny_chat_folder, capsys):
    assert main(["info", str(tiny_chat_folder)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "llama" and info["context_length"] == 256 and info["parameters"] > 1000


def test_generate_streams_text_and_reports_tokens_per_second(tiny_chat_folder, capsys):
    assert main(["generate", "Hello", "--model", str(tiny_chat_folder), "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert "tokens/s" in captured.err and captured.out.strip() != ""


def test_unknown_model_is_a_clear_error_with_exit_code_2(capsys):
    assert main(["info", "no-such-model"]) == 2
    assert "no model named or at 'no-such-model'" in capsys.readouterr().err


def test_invalid_sampling_setting_is_reported(tiny_chat_folder, capsys):
    assert main(["generate", "x", "--model", str(tiny_chat_folder), "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_chat_repl_answers_and_exits(tiny_chat_folder, monkeypatch, capsys):
    answers = iter(["hi there", "/reset", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    assert main(["chat", str(tiny_chat_folder), "--max-new-tokens", "3"]) == 0
    assert "tokens/s" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_on_the_embedded_model(capsys):
    assert main(["generate", "--chat", "What is the capital of France?", "--max-new-tokens", "12"]) == 0
    assert "Paris" in capsys.readouterr().out
