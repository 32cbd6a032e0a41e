"""`lmsmith evaluate` through its verb function: files written, markdown printed, errors reported."""
import argparse
import json

import pytest

from lmsmith.cli import main
from lmsmith.evaluate.cli_verbs import VERBS, batch_sizes, default_out
from lmsmith.io.artifact import new_manifest, save_artifact
from lmsmith.io.checkpoint import save_hf_folder

from .conftest import TINY_DATASET, tiny_lm, varied_classifier

QUICK = ["--repeats", "2", "--batch-sizes", "1,2", "--device", "cpu"]


def run_verb(argv: list[str]) -> None:
    _, setup, run = VERBS["evaluate"]
    parser = argparse.ArgumentParser()
    setup(parser)
    run(parser.parse_args(argv))


@pytest.fixture(scope="module")
def classifier_artifact(tmp_path_factory, tok):
    """An artifact fine-tuned (per its manifest) on the tiny dataset with a 30-example test split."""
    model = varied_classifier(tok)
    manifest = new_manifest(model.config, "test")
    manifest["history"] = [{"op": "finetune", "recipe": {"data": {
        "source": TINY_DATASET, "sizes": {"train": 100, "validation": 10, "test": 30}, "seed": 0, "stratify": True}}}]
    return save_artifact(model, tmp_path_factory.mktemp("art") / "clf", tok, manifest)


def test_cli_classifier_artifact(classifier_artifact, tmp_path, capsys):
    run_verb([str(classifier_artifact), "--out", str(tmp_path / "r"), *QUICK])
    printed = capsys.readouterr().out
    assert "| accuracy |" in printed and "### Confusion matrix" in printed and "wrote " in printed
    names = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert names == ["confusion_matrix.png", "latency.png", "report.json", "report.md"]
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert data["data"] == TINY_DATASET and data["examples"] == 30 and data["model"] == str(classifier_artifact)


def test_cli_csv_with_columns_and_limit(classifier_artifact, tmp_path, capsys):
    csv = tmp_path / "d.csv"
    csv.write_text("body,stars\n" + "good great,positive\nbad sad,negative\nthe chair,neutral\n" * 3)
    run_verb([str(classifier_artifact), "--data", str(csv), "--text-column", "body", "--label-column", "stars",
              "--limit", "4", "--out", str(tmp_path / "r"), *QUICK])
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert data["examples"] == 4 and data["data"] == str(csv) and data["split"] is None


def test_cli_language_model_folder(tmp_path, tok, capsys):
    folder = save_hf_folder(tiny_lm(tok), tmp_path / "lm", tokenizer=tok)
    run_verb([str(folder), "--limit", "2", "--seq-len", "64", "--out", str(tmp_path / "r"), *QUICK])
    assert "| perplexity |" in capsys.readouterr().out
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert data["examples"] == 2 and data["generation"]["batch_size"] == 1
    assert (tmp_path / "r" / "latency.png").exists() and not (tmp_path / "r" / "confusion_matrix.png").exists()


def test_cli_errors_are_reported_with_exit_code_2(classifier_artifact, tmp_path, capsys):
    code = main(["evaluate", str(classifier_artifact), "--data", str(tmp_path / "missing.csv"), *QUICK])
    assert code == 2 and "neither a registered dataset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", str(classifier_artifact), "--batch-sizes", "1,x"])


def test_batch_size_parsing_and_default_out():
    assert batch_sizes("1, 8,32") == (1, 8, 32)
    for bad in ("", "0,2", "a"):
        with pytest.raises(argparse.ArgumentTypeError):
            batch_sizes(bad)
    assert str(default_out("runs/tune-full-1/model")) == "runs/evaluate/runs-tune-full-1-model"
    assert str(default_out("smollm2-135m-instruct")) == "runs/evaluate/smollm2-135m-instruct"
