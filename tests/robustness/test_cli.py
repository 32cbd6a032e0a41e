import csv
import json

import pytest

from lmsmith.cli import main
from lmsmith.io.artifact import new_manifest, save_artifact
from lmsmith.model.transformer import Transformer
from lmsmith.robustness.report import load_eval_data, training_data_options

from .conftest import classifier_config, planted_classifier, sentences


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    return save_artifact(planted_classifier(tokenizer), tmp_path / "clf", tokenizer)


def write_csv(path, texts, labels):
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(zip(texts, labels))
    return path


def test_robustness_verb_writes_reports_and_prints_the_table(tmp_path, model_dir, capsys):
    data = write_csv(tmp_path / "d.csv", *sentences(16))
    out = tmp_path / "report"
    code = main(["robustness", str(model_dir), "--data", str(data), "--perturbations", "typos", "case",
                           "--severities", "0.2", "0.5", "--attack", "greedy", "--attack-limit", "6",
                           "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| typo_swap | 0.2 |" in printed and "| case | 0.5 |" in printed and "Attack `greedy`" in printed
    assert {p.name for p in out.iterdir()} == {"report.md", "report.json", "robustness.png"}
    report = json.loads((out / "report.json").read_text())
    assert report["suite"]["clean_accuracy"] == 1.0 and len(report["suite"]["rows"]) == 10
    assert report["attack"]["count"] == 6 and report["attack"]["success_rate"] == pytest.approx(0.5)
    assert (out / "report.md").read_text().startswith("# Robustness of")


def test_attack_none_and_limit(tmp_path, model_dir, capsys):
    data = write_csv(tmp_path / "d.csv", *sentences(16))
    assert main(["robustness", str(model_dir), "--data", str(data), "--limit", "5", "--attack", "none",
                           "--severities", "0.3", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "on 5 texts" in printed and "Attack" not in printed


@pytest.mark.parametrize("args, message", [
    (["--perturbations", "typoz"], "unknown perturbation 'typoz'; choose from"),
    (["--attack", "fgsm"], "unknown attack 'fgsm'; choose one of ['greedy', 'hotflip', 'none']"),
    (["--severities", "1.5"], "severity must be in [0, 1]"),
    (["--data", "nowhere.csv"], "neither a registered data set"),
    (["--data", "tweets-sentiment", "--split", "dev"], "unknown split 'dev'"),
])
def test_errors_name_what_is_allowed(tmp_path, model_dir, capsys, args, message):
    data = write_csv(tmp_path / "d.csv", *sentences(4))
    argv = ["robustness", str(model_dir), "--data", str(data), "--no-progress", "--attack", "none", *args]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_not_a_classifier_and_empty_data(tmp_path, tokenizer, model_dir, capsys):
    lm = save_artifact(Transformer(classifier_config(tokenizer, task="causal-lm", labels=())), tmp_path / "lm",
                       tokenizer)
    data = write_csv(tmp_path / "d.csv", *sentences(4))
    assert main(["robustness", str(lm), "--data", str(data), "--no-progress"]) == 2
    assert "need a 'sequence-classification' model" in capsys.readouterr().err
    empty = write_csv(tmp_path / "empty.csv", [], [])
    assert main(["robustness", str(model_dir), "--data", str(empty), "--no-progress"]) == 2
    assert "no labelled texts" in capsys.readouterr().err


def test_registered_data_uses_the_models_training_splits(tokenizer):
    model = planted_classifier(tokenizer)
    sizes = {"train": 50, "validation": 10, "test": 20}
    model.manifest = new_manifest(model.config, "test")
    model.manifest["history"].append({"op": "finetune", "recipe": {"data": {
        "source": "tweets-sentiment", "sizes": sizes, "ratios": [0.8, 0.1, 0.1], "seed": 3, "stratify": True}}})
    assert training_data_options(model, "tweets-sentiment")["seed"] == 3
    assert training_data_options(model, "other") == {}
    data = load_eval_data("tweets-sentiment", "test", 100, model)
    assert len(data.texts) == 20 and "the model's training splits" in data.description
    assert set(data.labels) <= {"negative", "neutral", "positive"}
    assert len(load_eval_data("tweets-sentiment", "test", 7, model).texts) == 7
    with pytest.raises(ValueError, match="limit must be >= 1"):
        load_eval_data("tweets-sentiment", "test", 0, model)


def test_package_exports_resolve_lazily():
    from lmsmith import robustness

    for name in robustness.__all__:
        assert getattr(robustness, name) is not None, name
    assert callable(robustness.augment) and callable(robustness.attack)  # functions, not same-named modules
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        robustness.nope  # noqa: B018
