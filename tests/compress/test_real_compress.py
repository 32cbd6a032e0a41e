"""The compression pipeline on the embedded real models (slow: loads SmolLM2-135M / MiniLM-L6)."""
import pytest
import torch

from lmsmith.api import load
from lmsmith.compress.distill import distill, mean_kl, student_from_teacher
from lmsmith.compress.heldout import HELDOUT_PARAGRAPHS
from lmsmith.compress.quantize import quantize_model
from lmsmith.compress.recipe import DataSpec, StepData
from lmsmith.compress.report import lm_eval_set, quality_metrics
from lmsmith.compress.structured import structured_prune
from lmsmith.io.artifact import load_artifact, new_manifest, save_artifact
from lmsmith.train.build import load_pretrained
from lmsmith.train.loop import TrainSettings

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    model, tok = load("smollm2")
    evalset = lm_eval_set(tok, "\n\n".join(HELDOUT_PARAGRAPHS[:3]), seq_len=128)
    return model, tok, evalset, quality_metrics(model, evalset)["perplexity"]


def test_smollm2_int8_keeps_perplexity(smollm2):
    _, _, evalset, base = smollm2
    quantized = load("smollm2")[0].eval()
    quantize_model(quantized, "int8")
    ratio = quality_metrics(quantized, evalset)["perplexity"] / base
    assert 5 < base < 100 and ratio < 1.03, (base, ratio)


def test_smollm2_int8_with_quantized_tied_head_keeps_perplexity_and_round_trips(smollm2, tmp_path):
    _, tok, evalset, base = smollm2
    model = load("smollm2")[0].eval()
    config = quantize_model(model, "int8", include_lm_head=True)
    assert config.tied_embeddings == (("embed.tokens", "lm_head"),)
    ratio = quality_metrics(model, evalset)["perplexity"] / base
    assert ratio < 1.03, ratio
    path = save_artifact(model, tmp_path / "int8-head", tok, new_manifest(model.config, "smollm2"))
    assert (path / "model.safetensors").stat().st_size < 140 * 2**20  # vs 210 MB with a float table
    loaded, _ = load_artifact(path)
    ids = torch.tensor([tok.encode("The village market opens")])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_smollm2_structured_pruning_is_smaller_still_works_and_round_trips(smollm2, tmp_path):
    _, tok, evalset, base = smollm2
    model = load("smollm2")[0].eval()
    calibration = [{"input_ids": b["input_ids"]} for b in evalset.batches[:1]]
    record = structured_prune(model, heads=1 / 3, neurons=0.125, layers=2, importance="calibration",
                              calibration=calibration)
    assert record["after"] == {"num_layers": 28, "num_heads": 6, "num_kv_heads": 3, "head_dim": 64,
                               "intermediate_size": 1344}
    assert model.num_parameters() < 0.85 * 134_515_008
    ppl = quality_metrics(model, evalset)["perplexity"]
    assert ppl < 20 * base, (base, ppl)  # damaged but not broken (no fine-tuning after pruning)
    ids = torch.tensor([tok.encode("The village market opens")])
    with torch.no_grad():
        expected = model(ids).logits
    save_artifact(model, tmp_path / "pruned", tok, new_manifest(model.config, "smollm2"))
    loaded, _ = load_artifact(tmp_path / "pruned")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected)


def test_minilm_three_layer_student_learns_from_the_six_layer_teacher(tmp_path):
    labels = ("negative", "neutral", "positive")
    teacher, tok = load_pretrained("minilm-l6", "sequence-classification", labels, torch.float32)
    teacher.eval()
    torch.manual_seed(0)
    with torch.no_grad():  # a decisive (seeded) head, so the KL has something to measure
        teacher.classifier.out.weight.normal_(0, 1.0)
    student = student_from_teacher(teacher, [0, 3, 5])
    assert student.config.num_layers == 3 and teacher.config.num_layers == 6
    spec = DataSpec(dataset="tweets-sentiment", sizes={"train": 128, "validation": 32, "test": 0}, max_length=48)
    data = StepData(spec, tok, "classifier")
    before = mean_kl(teacher, student, data.validation_batches)
    settings = TrainSettings(max_steps=8, batch_size=16, lr=1e-4, progress=False, tensorboard=False, device="cpu")
    distill(teacher, student, data.train_data, settings, tmp_path / "run", alpha=1.0)
    after = mean_kl(teacher, student, data.validation_batches)
    assert after < before, (before, after)
