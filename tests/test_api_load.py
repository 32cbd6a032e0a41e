"""`lmsmith.api.load` honours `task` and `labels` for lmsmith artifacts (tiny random models)."""
import pytest
import torch

from lmsmith.api import load
from lmsmith.compress.quantize import quantize_model
from lmsmith.io.artifact import new_manifest, save_artifact
from lmsmith.io.weights import CheckpointError
from lmsmith.model.config import PRESETS
from lmsmith.model.transformer import Transformer

LABELS = ("negative", "neutral", "positive")
IDS = torch.tensor([[2, 17, 40, 99, 3]])


def tiny_bert(task: str, labels: tuple[str, ...] = ()) -> Transformer:
    torch.manual_seed(0)
    config = PRESETS["tiny-bert"].replace(task=task, labels=labels, num_layers=1, vocab_size=128)
    return Transformer(config).eval()


@pytest.fixture(scope="module")
def classifier_artifact(tmp_path_factory):
    model = tiny_bert("sequence-classification", LABELS)
    path = save_artifact(model, tmp_path_factory.mktemp("cls") / "a", manifest=new_manifest(model.config, "test"))
    return model, path


def logits(model: Transformer) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_artifact_loads_as_saved_without_task_or_labels(classifier_artifact):
    model, path = classifier_artifact
    for kwargs in ({}, {"task": "sequence-classification"}, {"labels": LABELS}):
        loaded, _ = load(path, **kwargs)
        assert loaded.config.labels == LABELS and torch.allclose(logits(loaded), logits(model), atol=1e-6)


def test_artifact_labels_in_another_order_reorder_the_classes(classifier_artifact):
    model, path = classifier_artifact
    order = ("positive", "negative", "neutral")
    loaded, _ = load(path, labels=order)
    assert loaded.config.labels == order and loaded.manifest["source"] == "test"
    assert torch.allclose(logits(loaded), logits(model)[:, [2, 0, 1]], atol=1e-6)


def test_classifier_artifact_loads_as_its_base_model(classifier_artifact):
    model, path = classifier_artifact
    base, _ = load(path, task="base")
    assert base.config.task == "base" and base.config.labels == ()
    with torch.no_grad():
        hidden = base(IDS).hidden_states
        assert torch.allclose(model.classifier.out(torch.tanh(model.classifier.pooler(hidden[:, 0]))),
                              logits(model), atol=1e-5)


def test_impossible_combinations_raise_clear_errors(classifier_artifact, tmp_path):
    _, path = classifier_artifact
    with pytest.raises(ValueError, match=r"trained on labels \('negative', 'neutral', 'positive'\)"):
        load(path, labels=("bad", "good", "meh"))
    with pytest.raises(ValueError, match="trained on labels"):
        load(path, labels=("negative", "positive"))
    with pytest.raises(ValueError, match="labels apply only to classification tasks"):
        load(path, task="base", labels=LABELS)
    with pytest.raises(CheckpointError, match="holds a sequence-classification model and cannot be loaded as "
                                              "masked-lm.*missing tensor 'cls.predictions"):
        load(path, task="masked-lm")
    mlm = tiny_bert("masked-lm")
    mlm_path = save_artifact(mlm, tmp_path / "mlm", manifest=new_manifest(mlm.config, "test"))
    with pytest.raises(CheckpointError, match="holds a masked-lm model .*missing tensor 'bert.pooler.dense"):
        load(mlm_path, task="sequence-classification", labels=LABELS)
    with pytest.raises(ValueError, match="needs labels"):
        load(mlm_path, task="sequence-classification")


def test_quantized_artifact_refuses_another_task(tmp_path):
    model = tiny_bert("sequence-classification", LABELS)
    quantize_model(model, "int8")
    path = save_artifact(model, tmp_path / "q", manifest=new_manifest(model.config, "test"))
    loaded, _ = load(path, task="sequence-classification", labels=LABELS)
    assert torch.allclose(logits(loaded), logits(model), atol=1e-5)
    with pytest.raises(CheckpointError, match="quantized sequence-classification artifact .* loads only as saved"):
        load(path, task="base")


def test_hand_written_manifest_without_config_uses_config_json(classifier_artifact, tmp_path):
    import json
    import shutil

    _, path = classifier_artifact
    copy = shutil.copytree(path, tmp_path / "copy")
    (copy / "lmsmith.json").write_text(json.dumps({"format": "lmsmith-artifact/1", "source": "hand"}))
    base, _ = load(copy, task="base")
    assert base.config.task == "base" and base.manifest["source"] == "hand"


# -- device choice --

def test_resolve_device_names_the_problem():
    from lmsmith.api import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="'tpu'.*auto, cpu, cuda"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="'mps' is not supported"):
        resolve_device("mps")
    with pytest.raises(ValueError, match="cuda:99"):
        resolve_device("cuda:99")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_asking_for_cuda_without_it_is_a_clear_error(tiny_chat_folder):
    from lmsmith.serve.server import ServeOptions

    with pytest.raises(ValueError, match="CUDA is not available"):
        load(tiny_chat_folder, device="cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        ServeOptions(device="cuda")


def test_cli_device_flags_reach_the_loaders():
    from lmsmith.cli import build_parser
    from lmsmith.serve.cli_verbs import serve_options_from

    parser = build_parser()
    assert parser.parse_args(["generate", "hi"]).device == "auto"
    assert parser.parse_args(["chat", "--device", "cpu"]).device == "cpu"
    assert serve_options_from(parser.parse_args(["serve", "--device", "cpu"])).device == "cpu"
