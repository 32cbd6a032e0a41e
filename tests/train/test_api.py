"""pretrain / finetune end to end on tiny models: run folder contents, outputs that lmsmith and
transformers load, every objective, every PEFT method through the recipe, distillation, CLI verbs."""
import json

import pytest
import torch
import yaml

from lmsmith.api import load
from lmsmith.cli import main
from lmsmith.train import cli_verbs
from lmsmith.train.api import finetune, pretrain
from lmsmith.train.peft import load_adapter
from lmsmith.train.recipes import load_recipe, to_dict

from .conftest import save_chat_tokenizer, tiny_recipe, write_chat_jsonl, write_labelled_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pretrained_bert(tmp_path_factory, corpus):
    """A tiny BERT pretrained (masked LM) for a few steps: the source for the fine-tuning tests."""
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("bert")
    recipe = tiny_recipe(run_dir, corpus, "masked-lm", "tiny-bert", max_steps=4)
    recipe["tokenizer"]["kind"] = "wordpiece"
    return pretrain(recipe)


def test_pretrain_gpt_from_scratch_writes_a_complete_run_folder(tmp_path, corpus):
    result = pretrain(tiny_recipe(tmp_path, corpus, max_steps=4, eval_every=2, save_every=2, tensorboard=True))
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "results.json", "tensorboard", "checkpoints", "best", "model"} <= names
    saved = load_recipe(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert saved.train.max_steps == 4 and saved.model.preset == "tiny-gpt"
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["steps"] == 4 and results["test"]["perplexity"] > 1
    assert result.validation["loss"] == pytest.approx(results["validation"]["loss"])
    model, tokenizer = load(result.model_dir)
    assert model.config.vocab_size == tokenizer.vocab_size <= 300 and model.config.num_layers == 1
    assert model.manifest["history"][-1]["op"] == "pretrain"


def test_pretrained_gpt_loads_in_transformers_with_the_same_logits(tmp_path, corpus):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = pretrain(tiny_recipe(tmp_path, corpus, max_steps=3))
    ours, tokenizer = load(result.model_dir)
    theirs = AutoModelForCausalLM.from_pretrained(result.model_dir).eval()
    text = "the cat sat on a mat"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert AutoTokenizer.from_pretrained(result.model_dir)(text, add_special_tokens=False)["input_ids"] == ids
    with torch.no_grad():
        expected = theirs(torch.tensor([ids])).logits
        got = ours(torch.tensor([ids])).logits
    assert (expected - got).abs().max() < 1e-4


def test_pretrain_bert_mlm(pretrained_bert):
    assert pretrained_bert.steps == 4 and pretrained_bert.test["perplexity"] > 1
    model, tokenizer = load(pretrained_bert.model_dir)
    assert model.config.task == "masked-lm" and tokenizer.mask_id is not None


def test_pretrain_refuses_a_classification_recipe(tmp_path, corpus):
    with pytest.raises(ValueError, match="use finetune"):
        pretrain(tiny_recipe(tmp_path, corpus, "sequence-classification", "tiny-bert"))


def test_full_finetune_classifier_from_a_pretrained_source(tmp_path, pretrained_bert):
    data = write_labelled_jsonl(tmp_path / "rows.jsonl")
    recipe = tiny_recipe(tmp_path / "run", data, "sequence-classification", max_steps=40, eval_every=20,
                         lr=5e-3, batch_size=8)
    recipe["model"] = {"source": str(pretrained_bert.model_dir)}
    recipe.pop("tokenizer")
    recipe["train"]["metric"] = "macro_f1"
    result = finetune(recipe)
    assert result.model.config.labels == ("neg", "pos")  # inferred from the data, sorted
    assert {"accuracy", "macro_f1", "precision/neg", "recall/pos"} <= set(result.test)
    assert result.validation["accuracy"] > 0.6  # the cue words decide the label
    model, _ = load(result.model_dir)
    assert model.config.task == "sequence-classification"


PEFT_METHODS = {
    "lora": {"target_modules": ["q_proj", "v_proj"], "r": 4, "lora_alpha": 8},
    "dora": {"target_modules": ["q_proj", "v_proj"], "r": 4},
    "ia3": {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
    "adapter": {"target_modules": ["mlp"], "bottleneck_size": 8},
    "prefix": {"num_virtual_tokens": 3},
    "adalora": {"target_modules": ["q_proj", "v_proj"], "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1},
}


@pytest.fixture(scope="module")
def pretrained_llama(tmp_path_factory, corpus):
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("llama")
    return pretrain(tiny_recipe(run_dir, corpus, preset="tiny-llama", max_steps=2))


@pytest.mark.parametrize("method", sorted(PEFT_METHODS))
def test_every_peft_method_trains_through_the_recipe_and_saves_an_adapter(tmp_path, corpus, pretrained_llama,
                                                                          method):
    recipe = tiny_recipe(tmp_path, corpus, max_steps=4, lr=1e-2)
    recipe["model"] = {"source": str(pretrained_llama.model_dir)}
    recipe.pop("tokenizer")
    recipe["peft"] = {"method": method, **PEFT_METHODS[method], "save_merged": True}
    result = finetune(recipe)
    trained = result.model.eval()
    assert (result.adapter_dir / "adapter_config.json").is_file()
    assert (result.model_dir is not None) == (method in ("lora", "dora", "ia3", "adalora"))
    base, _ = load(pretrained_llama.model_dir)
    from lmsmith.io.weights import module_name_map

    inverse = {v: k for k, v in module_name_map(base.config).items()}
    restored = load_adapter(base, result.adapter_dir, name_map_inverse=lambda n: inverse.get(n, n)).eval()
    from lmsmith.train.objectives import forward

    batch = {"input_ids": torch.randint(0, base.config.vocab_size, (2, 10))}
    trained = trained.cpu()  # the run leaves it on its training device (a GPU where there is one)
    with torch.no_grad():
        assert torch.allclose(forward(trained, batch).logits, forward(restored, batch).logits, atol=1e-5)
        if result.model_dir is not None:
            merged, _ = load(result.model_dir)
            assert torch.allclose(merged(batch["input_ids"]).logits, forward(trained, batch).logits, atol=1e-4)
    if method == "adalora":
        from lmsmith.train.peft import active_ranks

        assert sum(active_ranks(trained).values()) == 2 * len(active_ranks(trained))  # allocation ran
    frozen = [n for n, p in trained.named_parameters() if not p.requires_grad]
    assert "embed.tokens.weight" in frozen


def test_chat_sft_with_lora_trains_on_assistant_tokens(tmp_path):
    tokenizer_dir = save_chat_tokenizer(tmp_path / "tok")
    data = write_chat_jsonl(tmp_path / "chat.jsonl")
    recipe = tiny_recipe(tmp_path / "run", data, "chat-sft", preset="tiny-llama", max_steps=3)
    recipe["tokenizer"] = {"source": str(tokenizer_dir)}
    recipe["data"]["max_length"] = 48
    recipe["peft"] = {"method": "lora", "target_modules": ["q_proj", "v_proj"], "r": 4}
    result = finetune(recipe)
    assert result.steps == 3 and result.test["tokens"] < 3 * len(result.test) * 10  # few target tokens
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["peft_type"] == "LORA"
    assert (result.adapter_dir / "tokenizer.json").is_file()


def test_token_classification_from_conll(tmp_path):
    rows = []
    for i in range(40):
        rows += ["the O", "cat B-ANIMAL" if i % 2 else "dog B-ANIMAL", "sat O", ""]
    (tmp_path / "tags.conll").write_text("\n".join(rows))
    recipe = tiny_recipe(tmp_path / "run", tmp_path / "tags.conll", "token-classification", "tiny-bert",
                         max_steps=6, lr=1e-2)
    recipe["tokenizer"]["kind"] = "wordpiece"
    result = finetune(recipe)
    assert result.model.config.labels == ("B-ANIMAL", "O")
    assert {"accuracy", "macro_f1", "precision/B-ANIMAL"} <= set(result.test)


def test_distillation_from_a_teacher_in_the_recipe(tmp_path, corpus, pretrained_llama):
    recipe = tiny_recipe(tmp_path, corpus, max_steps=2)
    recipe["model"] = {"source": str(pretrained_llama.model_dir)}
    recipe.pop("tokenizer")
    recipe["distill"] = {"teacher": str(pretrained_llama.model_dir), "temperature": 2.0, "alpha": 0.5}
    result = finetune(recipe)
    assert result.steps == 2 and result.model_dir is not None


def test_resume_through_the_api_continues_the_same_run(tmp_path, corpus):
    recipe = tiny_recipe(tmp_path / "a", corpus, max_steps=6, save_every=3)
    whole = pretrain(recipe)
    first = pretrain(recipe, ["train.max_steps=6"], output__dir=str(tmp_path / "b"))
    assert first.steps == 6
    with pytest.raises(ValueError, match="already holds checkpoints"):
        pretrain(recipe, output__dir=str(tmp_path / "b"))
    again = pretrain(recipe, output__dir=str(tmp_path / "b"), resume=True)
    assert again.resumed_from == 6 and again.steps == 6
    assert again.test["loss"] == pytest.approx(whole.test["loss"], abs=1e-6)


def test_cli_verbs(tmp_path, corpus, capsys):
    assert set(cli_verbs.VERBS) == {"pretrain", "finetune"}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe(tmp_path / "run", corpus, max_steps=2)))
    assert main(["pretrain", str(recipe), "train.lr=1e-3", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["lr"] == 1e-3 and printed["output"]["dir"] == str(tmp_path / "run")
    assert main(["pretrain", str(recipe), "train.lrr=1"]) == 2
    assert "unknown recipe key 'train.lrr'" in capsys.readouterr().err
    assert main(["pretrain", str(recipe)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 2 and out["model"].endswith("model")
    assert to_dict(load_recipe(str(recipe)))["train"]["max_steps"] == 2


def test_integer_labels_in_a_data_file_become_class_names(tmp_path, pretrained_bert):
    from lmsmith.train.build import load_splits, prepare_data

    rows = [{"text": f"the cat {'happy' if i % 2 else 'sad'}", "stars": i % 2} for i in range(20)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tiny_recipe(tmp_path, tmp_path / "rows.jsonl", "sequence-classification")
    recipe["model"] = {"source": str(pretrained_bert.model_dir)}
    recipe.pop("tokenizer")
    recipe["data"]["columns"] = {"text": "text", "label": "stars"}
    config = load_recipe(recipe)
    splits, labels = load_splits(config.data, config.objective)
    assert labels == ("0", "1")
    _, tokenizer = load(pretrained_bert.model_dir)
    data = prepare_data(config, tokenizer, splits, labels)
    assert sorted({int(f["label"]) for f in data.train.dataset.features}) == [0, 1]
    with pytest.raises(FileNotFoundError, match="neither a registered data set"):
        load_splits(load_recipe(recipe, ["data.source=/no/such/file.jsonl"]).data, config.objective)


def test_continued_pretraining_starts_from_the_source_weights(tmp_path, corpus, pretrained_llama):
    recipe = tiny_recipe(tmp_path, corpus, max_steps=3, lr=1e-9)  # lr ~0: the weights barely move
    recipe["model"] = {"source": str(pretrained_llama.model_dir)}
    recipe.pop("tokenizer")
    result = pretrain(recipe)
    assert result.test["loss"] == pytest.approx(pretrained_llama.test["loss"], abs=1e-4)
    model, _ = load(result.model_dir)
    assert model.manifest["source"] == str(pretrained_llama.model_dir)
