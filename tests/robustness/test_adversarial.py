import json

import pytest
import torch
from torch import nn

from lmsmith.data.collators import collate_padded
from lmsmith.robustness import AdversarialObjective, AdversarialSettings
from lmsmith.robustness.adversarial import project
from lmsmith.train.api import finetune
from lmsmith.train.objectives import sequence_classification
from lmsmith.train.recipes import load_recipe

from ..train.conftest import tiny_recipe, write_labelled_jsonl
from .conftest import LABELS, sentences


def a_batch(tokenizer):
    texts, labels = sentences(6)
    features = [{"input_ids": tokenizer.encode(t), "label": LABELS.index(y)} for t, y in zip(texts, labels)]
    return collate_padded(features, pad_id=tokenizer.pad_id)


def test_fgm_loss_is_clean_plus_a_larger_adversarial_loss(random_classifier, tokenizer):
    batch, plain = a_batch(tokenizer), sequence_classification(LABELS)
    clean, _ = plain(random_classifier, batch)
    loss, metrics = AdversarialObjective(plain, AdversarialSettings("fgm", epsilon=1.0))(random_classifier, batch)
    assert metrics["clean_loss"] == pytest.approx(float(clean.detach()), abs=1e-6)  # eval mode: no dropout
    assert metrics["adversarial_loss"] > metrics["clean_loss"]  # the step climbs the loss
    assert float(loss.detach()) == pytest.approx(metrics["clean_loss"] + metrics["adversarial_loss"], rel=1e-6)
    assert float(loss.detach()) != pytest.approx(float(clean.detach()))
    half, m = AdversarialObjective(plain, AdversarialSettings(epsilon=1.0, weight=0.5))(random_classifier, batch)
    assert float(half.detach()) == pytest.approx(m["clean_loss"] + 0.5 * m["adversarial_loss"], rel=1e-6)


def test_fgm_leaves_no_perturbation_behind(random_classifier, tokenizer):
    batch = a_batch(tokenizer)
    before = {k: v.clone() for k, v in random_classifier.state_dict().items()}
    with torch.no_grad():
        logits = random_classifier(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    objective = AdversarialObjective(sequence_classification(LABELS), AdversarialSettings("pgd", epsilon=2.0, steps=3))
    loss, _ = objective(random_classifier, batch)
    loss.backward()
    assert not random_classifier.embed.tokens._forward_hooks
    assert all(torch.equal(before[k], v) for k, v in random_classifier.state_dict().items())
    with torch.no_grad():
        again = random_classifier(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(logits, again)
    assert random_classifier.embed.tokens.weight.grad is not None


def test_hook_is_removed_even_when_the_inner_objective_fails(random_classifier):
    def broken(model, batch):
        raise RuntimeError("boom")

    broken.name = "broken"
    with pytest.raises(RuntimeError, match="boom"):
        AdversarialObjective(broken)(random_classifier, {"input_ids": torch.ones(1, 3, dtype=torch.long)})
    assert not random_classifier.embed.tokens._forward_hooks


def test_pgd_takes_k_steps_and_stays_in_the_ball(random_classifier, tokenizer):
    calls = []
    plain = sequence_classification(LABELS)

    def counting(model, batch):
        calls.append(1)
        return plain(model, batch)

    counting.name = "counting"
    AdversarialObjective(counting, AdversarialSettings("pgd", epsilon=0.5, steps=4))(random_classifier, a_batch(tokenizer))
    assert len(calls) == 1 + 3 + 1  # clean, 3 more ascent steps, the adversarial pass
    delta = torch.randn(3, 5, 8) * 10
    norms = project(delta, 0.5).flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.full((3,), 0.5), atol=1e-5)
    small = torch.full((2, 2, 2), 0.01)
    assert torch.equal(project(small, 0.5), small)


def test_works_with_frozen_embeddings(random_classifier, tokenizer):
    random_classifier.embed.tokens.weight.requires_grad_(False)
    _, metrics = AdversarialObjective(sequence_classification(LABELS))(random_classifier, a_batch(tokenizer))
    assert metrics["adversarial_loss"] > metrics["clean_loss"]


def test_settings_and_recipe_errors(random_classifier):
    cfg = load_recipe("minilm-sentiment-full", ["train.adversarial={method: pgd, epsilon: 0.5, steps: 2}"])
    assert cfg.train.adversarial == AdversarialSettings("pgd", 0.5, 2)
    assert load_recipe("minilm-sentiment-full").train.adversarial is None
    with pytest.raises(ValueError, match=r"train.adversarial.method='free' is not one of \('fgm', 'pgd'\)"):
        load_recipe("minilm-sentiment-full", ["train.adversarial={method: free}"])
    with pytest.raises(ValueError, match="epsilon > 0"):
        AdversarialSettings(epsilon=0)
    with pytest.raises(TypeError, match="no token embedding at embed.tokens"):
        AdversarialObjective(sequence_classification(LABELS))(nn.Linear(2, 2), {"input_ids": torch.ones(1, 2)})


def classification_recipe(run_dir, data, **train):
    recipe = tiny_recipe(run_dir, data, "sequence-classification", "tiny-bert", **train)
    recipe["train"]["adversarial"] = {"method": "fgm", "epsilon": 0.5}
    return recipe


def test_finetune_with_fgm_resumes_exactly(tmp_path, one_thread):
    data = write_labelled_jsonl(tmp_path / "d.jsonl", n=60)
    settings = {"max_steps": 6, "save_every": 3, "schedule": "constant", "warmup_steps": 0}
    whole = finetune(classification_recipe(tmp_path / "a", data, **settings))
    assert whole.steps == 6 and json.loads((tmp_path / "a" / "results.json").read_text())["steps"] == 6
    part = finetune(classification_recipe(tmp_path / "b", data, **{**settings, "max_steps": 3}))
    assert part.steps == 3 and (tmp_path / "b" / "checkpoints").is_dir()
    resumed = finetune(classification_recipe(tmp_path / "b", data, **settings), resume=True)
    assert resumed.resumed_from == 3 and resumed.steps == 6
    assert resumed.test["loss"] == pytest.approx(whole.test["loss"], abs=1e-6)
    plain_recipe = classification_recipe(tmp_path / "c", data, **settings)
    plain_recipe["train"]["adversarial"] = None
    plain = finetune(plain_recipe)
    assert plain.test["loss"] != pytest.approx(whole.test["loss"], abs=1e-6)  # FGM changed the training


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fgm", "pgd"])
def test_ddp_two_processes_match_one_with_adversarial_training(tmp_path, method):
    """Per-example perturbations do not depend on how the batch is split across ranks, so 2 gloo
    processes × 2 examples must follow 1 process × 4 examples (the DDP path of AdversarialObjective)."""
    import yaml

    from lmsmith.train.loop import read_metrics

    from ..train.test_distributed import run_cli

    data = write_labelled_jsonl(tmp_path / "d.jsonl", n=60)
    recipe = classification_recipe(tmp_path / "single", data, max_steps=4, batch_size=4)
    recipe["train"]["adversarial"] = {"method": method, "epsilon": 0.5, "steps": 2}
    recipe["model"]["config"].update(hidden_dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_cli(["finetune", str(path)])
    run_cli(["finetune", str(path), "train.batch_size=2", f"output.dir={tmp_path / 'multi'}"], nproc=2)
    single = [r["loss"] for r in read_metrics(tmp_path / "single")]
    multi = [r["loss"] for r in read_metrics(tmp_path / "multi")]
    assert len(single) == len(multi) == 4 and single == pytest.approx(multi, abs=1e-5)
