"""Compression recipes: parsing, overrides, running steps into artifacts, quality gates."""
import json

import pytest
import torch
import yaml

from lmsmith.api import load
from lmsmith.compress.cli_verbs import VERBS
from lmsmith.compress.recipe import (
    QualityGateError,
    apply_overrides,
    load_recipe,
    parse_recipe,
    resolve_recipe,
    run_recipe,
)

from .conftest import TINY_DATASET

pytestmark = pytest.mark.usefixtures("one_thread")
FAST_MEASURE = {"batch_sizes": [1, 2], "new_tokens": 3, "repeats": 1}
SHIPPED = ["compress-smollm2-int8", "compress-smollm2-int4", "compress-smollm2-w8a8", "compress-minilm-distill",
           "compress-smollm2-wanda"]


def lm_recipe(folder, output, steps):
    return {"name": "tiny", "source": str(folder), "output": str(output), "measure": FAST_MEASURE,
            "data": {"dataset": TINY_DATASET, "seq_len": 32, "calibration_batches": 2, "heldout_seq_len": 64},
            "steps": steps}


def test_prune_then_quantize_writes_an_artifact_with_history_and_measurements(tiny_lm_folder, tmp_path):
    steps = [{"prune": {"method": "wanda", "sparsity": 0.5}}, {"quantize": {"method": "int8"}}]
    result = run_recipe(parse_recipe(lm_recipe(tiny_lm_folder, tmp_path / "out", steps)), log=lambda _: None)
    assert result.final == tmp_path / "out" / "02-quantize"
    assert not (tmp_path / "out" / "01-prune").exists()  # intermediate artifacts are not kept by default
    manifest = json.loads((result.final / "lmsmith.json").read_text())
    history = manifest["history"]
    assert [h["step"] for h in history] == ["source", "prune", "quantize"]
    assert history[1]["settings"]["method"] == "wanda" and history[1]["result"]["sparsity"] == pytest.approx(0.5)
    assert history[2]["result"]["method"] == "int8" and manifest["quantization"]["method"] == "int8"
    for entry in history:
        assert entry["measured"]["quality"]["perplexity"] > 1
    assert history[2]["compared_to_start"]["size_ratio"] < 0.6
    assert [m.name for m in result.measurements] == ["source", "01-prune", "02-quantize"]
    assert (tmp_path / "out" / "report.md").read_text().count("\n| ") == 4  # header + 3 models
    assert (tmp_path / "out" / "quality_vs_size.png").exists()
    model, _ = load(result.final)  # the artifact loads and runs
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == model.config.vocab_size


def test_structured_and_distill_steps_on_a_causal_lm(tiny_lm_folder, tmp_path):
    steps = [{"structured": {"heads": 0.5, "neurons": 0.25}},
             {"distill": {"keep_layers": [1], "train": {"max_steps": 2, "batch_size": 4}}}]
    recipe = lm_recipe(tiny_lm_folder, tmp_path / "out", steps) | {"keep_intermediate": True}
    result = run_recipe(parse_recipe(recipe), log=lambda _: None)
    structured = json.loads((tmp_path / "out" / "01-structured" / "lmsmith.json").read_text())
    assert structured["config"]["num_heads"] == 2 and structured["config"]["intermediate_size"] == 96
    final = json.loads((result.final / "lmsmith.json").read_text())
    assert final["config"]["num_layers"] == 1
    assert final["history"][-1]["result"]["kept_layers"] == [1]
    assert final["history"][-1]["result"]["train"]["steps"] == 2


def test_classifier_finetune_distill_quantize_with_baseline(tiny_encoder_folder, tmp_path):
    recipe = {"name": "cls", "source": str(tiny_encoder_folder), "task": "sequence-classification",
              "output": str(tmp_path / "out"), "measure": FAST_MEASURE,
              "data": {"dataset": TINY_DATASET, "max_length": 16, "sizes": {"train": 150, "validation": 30,
                                                                              "test": 60}},
              "steps": [{"finetune": {"baseline": True, "train": {"epochs": 3, "batch_size": 16, "lr": 1e-3}}},
                        {"distill": {"every": 2, "train": {"epochs": 1, "batch_size": 16, "lr": 1e-3}}},
                        {"quantize": {"method": "int8", "gate": {"macro_f1": {"max_drop": 0.5}}}}]}
    result = run_recipe(parse_recipe(recipe), log=lambda _: None)
    history = json.loads((result.final / "lmsmith.json").read_text())["history"]
    assert [h["step"] for h in history] == ["source", "finetune", "distill", "quantize"]
    assert history[2]["start"] == "01-finetune"  # the baseline step is the start for later comparisons
    assert history[3]["gate"]["passed"] is True
    assert history[1]["measured"]["quality"]["macro_f1"] > history[0]["measured"]["quality"]["macro_f1"]
    model, _ = load(result.final)
    assert model.config.task == "sequence-classification" and model.config.num_layers == 1


def test_failing_gate_stops_with_a_clear_error_and_keeps_the_last_passing_artifact(tiny_encoder_folder, tmp_path):
    recipe = {"name": "gated", "source": str(tiny_encoder_folder), "task": "sequence-classification",
              "output": str(tmp_path / "out"), "measure": FAST_MEASURE,
              "data": {"dataset": TINY_DATASET, "max_length": 16},
              "steps": [{"finetune": {"baseline": True, "train": {"epochs": 4, "batch_size": 16, "lr": 2e-3}}},
                        # zeroing the classifier head makes every prediction the same class
                        {"prune": {"method": "magnitude", "sparsity": 0.99, "targets": ["classifier.*"],
                                   "gate": {"macro_f1": {"max_drop": 0.01}}}},
                        {"quantize": {"method": "int8"}}]}
    with pytest.raises(QualityGateError, match=r"step 02-prune: quality gate failed: macro_f1 went from") as info:
        run_recipe(parse_recipe(recipe), log=lambda _: None)
    assert "Kept the last passing artifact" in str(info.value) and info.value.kept.endswith("01-finetune")
    assert (tmp_path / "out" / "01-finetune" / "lmsmith.json").exists()
    assert not (tmp_path / "out" / "02-prune").exists() and not (tmp_path / "out" / "03-quantize").exists()
    assert "02-prune (rejected)" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize("change, message", [
    ({"steps": [{"sharpen": {}}]}, "unknown step 'sharpen'"),
    ({"steps": [{"quantize": {"metod": "int8"}}]}, r"steps\[0\].quantize: unknown key\(s\) \['metod'\]"),
    ({"colour": "red"}, r"unknown key\(s\) \['colour'\]"),
    ({"data": {"datset": "x"}}, r"data: unknown key\(s\) \['datset'\]"),
    ({"measure": {"batch": 2}}, r"measure: unknown key\(s\) \['batch'\]"),
    ({"steps": [{"quantize": {"gate": {"macro_f1": {"max_fall": 1}}}}]}, "max_drop"),
    ({"steps": [{"quantize": {"gate": {"macro_f1": {"max_drop": 1}, "against": "yesterday"}}}]}, "against"),
    ({"steps": [{"quantize": {}}, {"prune": {}}]}, "after quantize"),
    ({"steps": []}, "non-empty"),
    ({"steps": [{"quantize": {}, "prune": {}}]}, "one mapping"),
    ({"task": "masked-lm"}, "task"),
])
def test_bad_recipes_name_the_problem(change, message):
    raw = {"name": "x", "source": "smollm2", "output": "out", "steps": [{"quantize": {"method": "int8"}}]}
    with pytest.raises(ValueError, match=message):
        parse_recipe(raw | change)


def test_missing_required_keys():
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['source', 'output'\]"):
        parse_recipe({"name": "x", "steps": [{"quantize": {}}]})


def test_unknown_train_setting_is_named_when_the_step_runs(tiny_lm_folder, tmp_path):
    steps = [{"distill": {"num_layers": 1, "train": {"learning_rate": 1}}}]
    with pytest.raises(ValueError, match=r"distill.train: unknown key\(s\) \['learning_rate'\]"):
        run_recipe(parse_recipe(lm_recipe(tiny_lm_folder, tmp_path / "out", steps)), log=lambda _: None)


def test_distill_needs_exactly_one_layer_choice(tiny_lm_folder, tmp_path):
    steps = [{"distill": {"num_layers": 1, "every": 2}}]
    with pytest.raises(ValueError, match="exactly one of keep_layers, num_layers, every"):
        run_recipe(parse_recipe(lm_recipe(tiny_lm_folder, tmp_path / "out", steps)), log=lambda _: None)


def test_overrides_set_nested_keys_and_list_items():
    raw = {"output": "a", "steps": [{"prune": {"sparsity": 0.5}}, {"quantize": None}]}
    out = apply_overrides(raw, ["output=b", "steps.0.prune.sparsity=0.3", "steps.1.quantize.method=int4",
                                "data.sizes.test=200"])
    assert out == {"output": "b", "steps": [{"prune": {"sparsity": 0.3}}, {"quantize": {"method": "int4"}}],
                   "data": {"sizes": {"test": 200}}}
    assert raw["output"] == "a"  # the input is not modified
    with pytest.raises(ValueError, match="KEY=VALUE"):
        apply_overrides(raw, ["output"])
    with pytest.raises(ValueError, match="not an index"):
        apply_overrides(raw, ["steps.5.prune.sparsity=1"])


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_parse(name):
    recipe = load_recipe(name, ["output=/tmp/elsewhere"])
    assert recipe.output == "/tmp/elsewhere" and recipe.steps
    assert resolve_recipe(name + ".yaml") == resolve_recipe(name)


def test_unknown_recipe_lists_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match="compress-smollm2-int8"):
        resolve_recipe("compress-nothing")


def test_recipe_file_errors_name_the_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "source": "s", "output": "o", "steps": [{"fold": {}}]}))
    with pytest.raises(ValueError, match=r"r.yaml: steps\[0\]: unknown step 'fold'"):
        load_recipe(path)


def test_cli_verb_parses_recipe_and_overrides():
    import argparse

    help_text, setup, run = VERBS["compress"]
    parser = argparse.ArgumentParser()
    setup(parser)
    args = parser.parse_args(["my.yaml", "output=x", "steps.0.quantize.method=int4"])
    assert args.recipe == "my.yaml" and args.overrides == ["output=x", "steps.0.quantize.method=int4"]
    assert "compression recipe" in help_text and callable(run)


def test_cli_runs_a_recipe_file_and_reports_a_failed_gate_cleanly(tiny_lm_folder, tmp_path, capsys):
    from lmsmith.cli import main

    recipe = lm_recipe(tiny_lm_folder, tmp_path / "out", [{"quantize": {"method": "int8"}}])
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["compress", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| 01-quantize |" in out and f"final artifact: {tmp_path / 'out' / '01-quantize'}" in out
    # a gate no model can pass: perplexity must fall to a tenth
    assert main(["compress", str(path), f"output={tmp_path / 'gated'}",
                 "steps.0.quantize.gate={perplexity: {max_ratio: 0.1}}"]) == 2
    err = capsys.readouterr().err
    assert "lmsmith compress: error:" in err and "quality gate failed: perplexity" in err
    assert "Kept the last passing artifact: the source model" in err


def test_quantize_step_can_include_the_tied_lm_head(tiny_lm_folder, tmp_path):
    from lmsmith.compress.quantize import QuantizedEmbedding

    steps = [{"quantize": {"method": "int8", "include_lm_head": True}}]
    result = run_recipe(parse_recipe(lm_recipe(tiny_lm_folder, tmp_path / "out", steps)), log=lambda _: None)
    manifest = json.loads((result.final / "lmsmith.json").read_text())
    assert manifest["history"][1]["result"]["tied_embeddings"] == [["embed.tokens", "lm_head"]]
    assert "lm_head" in manifest["quantization"]["modules"]
    model, _ = load(result.final)
    assert isinstance(model.embed.tokens, QuantizedEmbedding)
    assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == model.config.vocab_size
