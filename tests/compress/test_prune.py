import pytest
import torch
from torch import nn

from lmsmith.compress.prune import (
    PRUNE_METHODS,
    LayerSparsity,
    attention_head_importance,
    ffn_neuron_importance,
    global_magnitude_masks,
    head_channel_indices,
    input_column_norms,
    magnitude_mask,
    nm_mask,
    prune_linear_inputs,
    prune_linear_outputs,
    prune_model,
    reapply_masks,
    remove_masks,
    restore_masks,
    sparsity_report,
    top_k_indices,
    wanda_mask,
)


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 8))


def zero_fraction(t: torch.Tensor) -> float:
    return (t == 0).float().mean().item()


# ---- masks ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_magnitude_mask_prunes_exactly_the_smallest(sparsity):
    w = torch.randn(24, 40)
    mask = magnitude_mask(w, sparsity)
    assert (~mask).sum().item() == round(sparsity * w.numel())
    if 0 < sparsity:
        assert w[~mask].abs().max() <= w[mask].abs().min()


def test_global_magnitude_prunes_small_scale_layers_more():
    weights = {"big": torch.randn(16, 16) * 10, "small": torch.randn(16, 16)}
    masks = global_magnitude_masks(weights, 0.5)
    pruned = {name: (~m).float().mean().item() for name, m in masks.items()}
    assert (pruned["big"] * 256 + pruned["small"] * 256) == 256  # exactly half overall
    assert pruned["small"] > 0.8 and pruned["big"] < 0.2


def test_nm_mask_keeps_n_of_every_m():
    scores = torch.rand(8, 32)
    mask = nm_mask(scores, 2, 4)
    assert (mask.reshape(8, 8, 4).sum(-1) == 2).all()
    kept_min = torch.where(mask, scores, torch.inf).reshape(8, 8, 4).amin(-1)
    dropped_max = torch.where(mask, -torch.inf, scores).reshape(8, 8, 4).amax(-1)
    assert (kept_min >= dropped_max).all()  # the kept two are the two largest
    assert (nm_mask(scores, 1, 8).reshape(8, 4, 8).sum(-1) == 1).all()


def test_nm_mask_rejects_bad_n_m():
    with pytest.raises(ValueError, match="0 < n < m"):
        nm_mask(torch.rand(4, 8), 4, 4)
    with pytest.raises(ValueError, match="multiple of m=4"):
        nm_mask(torch.rand(4, 10), 2, 4)


def test_wanda_keeps_high_activation_column_that_magnitude_drops():
    torch.manual_seed(0)
    weight = torch.rand(8, 16) + 1.0  # magnitudes in [1, 2)
    weight[:, 0] = 0.1  # a small-weight column ...
    calibration = [torch.randn(32, 16) * torch.tensor([100.0] + [1.0] * 15)]  # ... fed by a huge input
    norms = input_column_norms(nn.Sequential(nn.Linear(16, 8)), ["0"], calibration)["0"]
    by_magnitude, by_wanda = magnitude_mask(weight, 0.25), wanda_mask(weight, norms, 0.25)
    assert not by_magnitude[:, 0].any()  # magnitude prunes the whole column
    assert by_wanda[:, 0].all()  # wanda keeps it
    assert ((~by_wanda).sum(1) == 4).all()  # per-row comparison group: 25% of each row


def test_input_column_norms_are_l2_over_all_tokens():
    model = nn.Sequential(nn.Linear(3, 2))
    batches = [torch.randn(4, 3), torch.randn(2, 5, 3)]
    norms = input_column_norms(model, ["0"], batches)["0"]
    x = torch.cat([batches[0], batches[1].reshape(-1, 3)])
    torch.testing.assert_close(norms, x.norm(dim=0))


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "0.5"])
def test_bad_sparsity_is_rejected(bad):
    with pytest.raises(ValueError, match="sparsity"):
        magnitude_mask(torch.randn(4, 4), bad)
    with pytest.raises(ValueError, match="sparsity"):
        prune_model(mlp(), "magnitude", bad)


# ---- whole model ----------------------------------------------------------------------------------
def test_prune_model_magnitude_hits_exact_sparsity_per_layer():
    model = mlp()
    report = prune_model(model, "magnitude", 0.5)
    assert [r.name for r in report] == ["0", "2", "4"]
    assert report[0] == LayerSparsity("0", (64, 32), 0.5)
    assert all(r.sparsity == 0.5 for r in report)
    assert zero_fraction(model[2].weight) == 0.5


def test_prune_model_global_sparsity_over_all_layers():
    model = mlp()
    report = prune_model(model, "magnitude-global", 0.6)
    total = sum(r.sparsity * r.shape[0] * r.shape[1] for r in report)
    numel = sum(r.shape[0] * r.shape[1] for r in report)
    assert total / numel == pytest.approx(0.6, abs=1 / numel)
    assert len({r.sparsity for r in report}) > 1  # layers end up different


@pytest.mark.parametrize("method", ["nm-magnitude", "nm-wanda"])
def test_prune_model_2_4_pattern_holds_in_every_group(method):
    model = mlp()
    calibration = [torch.randn(8, 32) for _ in range(2)]
    report = prune_model(model, method, calibration=calibration)
    assert all(r.sparsity == 0.5 for r in report)
    for layer in (model[0], model[2], model[4]):
        nonzero = (layer.weight != 0).reshape(layer.out_features, -1, 4).sum(-1)
        assert (nonzero == 2).all()


def test_prune_model_wanda_uses_calibration_and_respects_exclude():
    model = mlp()
    calibration = [torch.randn(8, 32) for _ in range(3)]
    report = prune_model(model, "wanda", 0.25, exclude=["4"], calibration=calibration)
    assert [r.name for r in report] == ["0", "2"]
    assert zero_fraction(model[4].weight) == 0.0
    assert ((model[0].weight == 0).sum(1) == 8).all()  # 25% of each 32-wide row


def test_prune_model_error_paths():
    with pytest.raises(ValueError, match="magnitude, magnitude-global, wanda, nm-magnitude, nm-wanda"):
        prune_model(mlp(), "random", 0.5)
    with pytest.raises(ValueError, match="calibration"):
        prune_model(mlp(), "wanda", 0.5)
    with pytest.raises(ValueError, match="needs a sparsity"):
        prune_model(mlp(), "magnitude")
    with pytest.raises(ValueError, match="gives sparsity 0.5"):
        prune_model(mlp(), "nm-magnitude", 0.7)
    model = nn.Sequential(nn.Linear(6, 4))
    with pytest.raises(ValueError, match="layer '0'.*multiple of m=4"):
        prune_model(model, "nm-magnitude", exclude=())
    assert set(PRUNE_METHODS) >= {"magnitude", "wanda"}


def test_masks_survive_training_steps_but_not_state_dict_keys():
    model = mlp()
    keys_before = set(model.state_dict())
    prune_model(model, "magnitude", 0.5)
    assert set(model.state_dict()) == keys_before
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # a stand-in for an optimizer step
    assert zero_fraction(model[0].weight) == 0.0
    assert reapply_masks(model) == 3
    assert [r.sparsity for r in sparsity_report(model)] == [0.5, 0.5, 0.5]


def test_restore_and_remove_masks():
    model, fresh = mlp(), mlp(seed=1)
    prune_model(model, "magnitude", 0.5)
    fresh.load_state_dict(model.state_dict())  # a reload has no masks ...
    assert reapply_masks(fresh) == 0
    assert restore_masks(fresh) == 3  # ... but they can be rebuilt from the zeros
    with torch.no_grad():
        fresh[0].weight.add_(1.0)
    reapply_masks(fresh)
    assert torch.equal(fresh[0].weight == 0, model[0].weight == 0)
    assert remove_masks(fresh) == 3 and reapply_masks(fresh) == 0


# ---- structured -----------------------------------------------------------------------------------
def test_shrinking_ffn_keeps_kept_neurons_identical():
    torch.manual_seed(0)
    up, down = nn.Linear(16, 32), nn.Linear(32, 16)
    x = torch.randn(5, 16)
    keep = top_k_indices(ffn_neuron_importance(down.weight, in_weights=[up.weight]), 20)
    small_up, small_down = prune_linear_outputs(up, keep), prune_linear_inputs(down, keep)
    assert (small_up.in_features, small_up.out_features) == (16, 20)
    assert (small_down.in_features, small_down.out_features) == (20, 16)
    with torch.no_grad():
        hidden = torch.relu(up(x))
        torch.testing.assert_close(small_up(x), up(x)[:, keep])
        masked = torch.zeros_like(hidden)
        masked[:, keep] = hidden[:, keep]
        torch.testing.assert_close(small_down(torch.relu(small_up(x))), down(masked))


def test_structured_helpers_reject_bad_indices():
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        prune_linear_outputs(nn.Linear(3, 4), [0, 4])
    with pytest.raises(ValueError, match="distinct"):
        prune_linear_inputs(nn.Linear(3, 4), [1, 1])
    with pytest.raises(ValueError, match="non-empty"):
        prune_linear_inputs(nn.Linear(3, 4), [])


def test_ffn_importance_prefers_neurons_with_large_activations():
    down = torch.ones(8, 6)
    norms = torch.tensor([1.0, 5.0, 0.1, 2.0, 3.0, 0.5])
    assert top_k_indices(ffn_neuron_importance(down, norms), 3).tolist() == [1, 3, 4]
    with pytest.raises(ValueError, match="activation_norms"):
        ffn_neuron_importance(down, torch.ones(5))


def test_attention_head_importance_and_channel_indices():
    o_weight = torch.randn(8, 12)  # 3 heads of dim 4
    o_weight[:, 4:8] = 0.0  # head 1 contributes nothing
    scores = attention_head_importance(o_weight, head_dim=4)
    assert scores.shape == (3,) and scores[1] == 0 and scores.argmin() == 1
    norms = torch.ones(12)
    norms[0:4] = 0.0  # head 0 never active during calibration
    assert attention_head_importance(o_weight, 4, norms)[0] == 0
    keep = top_k_indices(scores, 2)
    assert keep.tolist() == [0, 2]
    assert head_channel_indices(keep, 4).tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    with pytest.raises(ValueError, match="head_dim 5"):
        attention_head_importance(o_weight, 5)


def test_pruning_heads_via_o_proj_inputs_matches_zeroed_heads():
    torch.manual_seed(0)
    o_proj = nn.Linear(12, 8)
    attn_out = torch.randn(3, 12)
    channels = head_channel_indices([0, 2], 4)
    small = prune_linear_inputs(o_proj, channels)
    zeroed = attn_out.clone()
    zeroed[:, 4:8] = 0.0
    with torch.no_grad():
        torch.testing.assert_close(small(attn_out[:, channels]), o_proj(zeroed))
