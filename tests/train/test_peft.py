"""PEFT: parity with Hugging Face peft on a toy model, the folder format both ways, merge exactness,
AdaLoRA rank allocation, adapters, prefixes and the error paths."""

from __future__ import annotations

import copy
import json
from itertools import pairwise
from types import SimpleNamespace

import peft as hf_peft
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lmsmith.train.peft import (
    AdaLoraConfig,
    BottleneckConfig,
    IA3Config,
    LoraConfig,
    PrefixConfig,
    PrefixEncoder,
    TrainingCallback,
    active_ranks,
    adapters_disabled,
    apply_peft,
    budget_schedule,
    load_adapter,
    merge_peft,
    peft_callbacks,
    peft_named_parameters,
    peft_state_dict,
    prefix_for,
    save_adapter,
    svd_modules,
    trainable_parameters_report,
    unload_peft,
    unmerge_peft,
)

D, FF = 16, 24


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(D, D), nn.Linear(D, D, bias=False)
        self.v_proj, self.o_proj = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x):  # returns a tuple, like the real attention module
        return self.o_proj(self.q_proj(x) * torch.sigmoid(self.k_proj(x)) + self.v_proj(x)), None


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.up_proj, self.down_proj = nn.Linear(D, FF), nn.Linear(FF, D)

    def forward(self, x):
        return self.down_proj(F.gelu(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.mlp = Attn(), Mlp()

    def forward(self, x):
        x = x + self.attn(x)[0]
        return x + self.mlp(x)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.score = nn.Linear(D, 3)

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return self.score(x)


class HFToy(nn.Module):
    """The same network under other module names (`model.` prefix), as an HF checkpoint would have."""

    def __init__(self, toy: Toy):
        super().__init__()
        self.model = toy

    def forward(self, x):
        return self.model(x)


def to_hf(name: str) -> str:
    return "model." + name


def from_hf(name: str) -> str:
    return name.removeprefix("model.")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def toy() -> Toy:
    torch.manual_seed(0)
    return Toy().eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1))


def randomize_adapters(model: nn.Module, seed: int = 3) -> None:
    """Adapters start as the identity map; give them values so comparisons mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_state_dict(model).items():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith(("ia3_l", "lora_magnitude_vector")):
                p.mul_(1 + 0.2 * noise)
            else:
                p.copy_(0.3 * noise)


# our state-dict key ending → peft's in-memory parameter name ending (peft inserts the adapter name)
PEFT_PARAM = {
    "lora_A.weight": "lora_A.default.weight",
    "lora_B.weight": "lora_B.default.weight",
    "lora_magnitude_vector": "lora_magnitude_vector.default.weight",
    "ia3_l": "ia3_l.default",
    "lora_A": "lora_A.default",
    "lora_B": "lora_B.default",
    "lora_E": "lora_E.default",
}


def peft_param_name(key: str) -> str:
    for ours, theirs in PEFT_PARAM.items():
        if key.endswith("." + ours):
            return "base_model.model." + key[: -len(ours)] + theirs
    raise AssertionError(key)


def copy_adapters_into_peft(ours: nn.Module, peft_model: nn.Module) -> None:
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for key, tensor in peft_state_dict(ours).items():
            params[peft_param_name(key)].copy_(tensor)


def hf_config(config):
    """The equivalent peft config object."""
    if isinstance(config, LoraConfig):
        return hf_peft.LoraConfig(
            r=config.r,
            lora_alpha=config.lora_alpha,
            target_modules=list(config.target_modules),
            use_dora=config.use_dora,
            use_rslora=config.use_rslora,
            lora_dropout=config.lora_dropout,
        )
    if isinstance(config, IA3Config):
        return hf_peft.IA3Config(
            target_modules=list(config.target_modules), feedforward_modules=list(config.feedforward_modules)
        )
    return hf_peft.AdaLoraConfig(
        init_r=config.init_r,
        target_r=config.target_r,
        lora_alpha=config.lora_alpha,
        target_modules=list(config.target_modules),
        total_step=config.total_step,
        tinit=config.tinit,
        tfinal=config.tfinal,
        deltaT=config.deltaT,
    )


LORA = LoraConfig(target_modules=["q_proj", "v_proj", "up_proj"], r=4, lora_alpha=8)
DORA = LoraConfig(target_modules=["q_proj", "k_proj", "down_proj"], r=4, lora_alpha=8, use_dora=True)
RSDORA = LoraConfig(target_modules=["q_proj", "o_proj"], r=4, lora_alpha=6, use_dora=True, use_rslora=True)
RSLORA = LoraConfig(target_modules=["v_proj", "up_proj"], r=4, lora_alpha=6, use_rslora=True)
IA3 = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
ADALORA = AdaLoraConfig(
    target_modules=["q_proj", "v_proj"], init_r=4, target_r=2, total_step=10, tinit=2, tfinal=3
)
PARITY_CONFIGS = [LORA, DORA, RSDORA, RSLORA, IA3, ADALORA]
PARITY_IDS = ["lora", "dora", "rsdora", "rslora", "ia3", "adalora"]


def peft_twin(toy: Toy, config) -> nn.Module:
    return hf_peft.get_peft_model(copy.deepcopy(toy), hf_config(config)).eval()


# --- parity with peft -----------------------------------------------------------------------------------


@pytest.mark.parametrize("config", PARITY_CONFIGS, ids=PARITY_IDS)
def test_forward_and_gradients_match_peft(toy, x, config):
    theirs = peft_twin(toy, config)
    ours = apply_peft(copy.deepcopy(toy), config)
    randomize_adapters(ours)
    copy_adapters_into_peft(ours, theirs)
    out, ref = ours(x), theirs(x)
    assert (out - ref).abs().max() < 1e-5
    assert (out - toy(x)).abs().max() > 1e-3  # the adapters do something
    out.square().sum().backward()
    ref.square().sum().backward()
    grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        if p.requires_grad:  # DoRA: the detached norm shows up here
            assert torch.allclose(p.grad, grads[peft_param_name(name)].grad, atol=1e-5), name


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_training_forward_with_dropout_matches_peft(toy, x, use_dora):
    """Same dropout masks (same seed, one draw per module) → same training-mode outputs."""
    config = LoraConfig(target_modules=["q_proj", "down_proj"], r=4, lora_dropout=0.3, use_dora=use_dora)
    theirs = peft_twin(toy, config).train()
    ours = apply_peft(copy.deepcopy(toy), config).train()
    randomize_adapters(ours)
    copy_adapters_into_peft(ours, theirs)
    torch.manual_seed(11)
    out = ours(x)
    torch.manual_seed(11)
    assert (out - theirs(x)).abs().max() < 1e-5
    assert (out - ours.eval()(x)).abs().max() > 1e-3  # dropout was active


@pytest.mark.parametrize("config", PARITY_CONFIGS, ids=PARITY_IDS)
def test_our_saved_adapter_loads_in_peft(toy, x, config, tmp_path):
    ours = apply_peft(copy.deepcopy(toy), config)
    randomize_adapters(ours)
    save_adapter(ours, tmp_path, name_map=to_hf, base_model_name_or_path="toy", task_type=None)
    theirs = hf_peft.PeftModel.from_pretrained(HFToy(copy.deepcopy(toy)), tmp_path).eval()
    assert (theirs(x) - ours(x)).abs().max() < 1e-5
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == config.peft_type and saved["base_model_name_or_path"] == "toy"
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert all(k.startswith("base_model.model.model.layers.") and ".default" not in k for k in keys)


@pytest.mark.parametrize("config", PARITY_CONFIGS, ids=PARITY_IDS)
def test_peft_saved_adapter_loads_into_ours(toy, x, config, tmp_path):
    theirs = hf_peft.get_peft_model(HFToy(copy.deepcopy(toy)), hf_config(config)).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(toy), tmp_path, name_map_inverse=from_hf)
    assert (ours(x) - theirs(x)).abs().max() < 1e-5
    assert all(p.requires_grad == (name in peft_state_dict(ours)) for name, p in ours.named_parameters())


def test_adalora_rank_allocation_matches_peft(toy):
    """Same weights and gradients → peft's RankAllocator and ours mask the same singular values."""
    theirs = peft_twin(toy, ADALORA).train()
    ours = apply_peft(copy.deepcopy(toy), ADALORA).train()
    randomize_adapters(ours)
    copy_adapters_into_peft(ours, theirs)
    (callback,) = peft_callbacks(ours)
    their_params = dict(theirs.named_parameters())
    g = torch.Generator().manual_seed(7)
    for step in range(ADALORA.total_step + 2):
        for name, p in peft_named_parameters(ours):
            grad = torch.randn(p.shape, generator=g)
            p.grad, their_params[peft_param_name(name)].grad = grad.clone(), grad.clone()
        callback.on_step_end(step, ours)
        theirs.base_model.update_and_allocate(step)
        for name, p in peft_state_dict(ours).items():
            if name.endswith("lora_E"):
                assert torch.equal(p, their_params[peft_param_name(name)]), (step, name)
    kept = sum(int(keep.sum()) for keep in callback.allocator.rank_pattern.values())
    assert kept == ADALORA.target_r * 4 and sum(active_ranks(ours).values()) <= kept  # 2 targets × 2 layers


@pytest.mark.filterwarnings("ignore:The following rank_pattern keys:RuntimeWarning")  # peft warns on its own files
def test_adalora_reduced_rank_round_trips_with_peft(toy, x, tmp_path):
    """peft saves a trained AdaLoRA at its allocated ranks (rank_pattern); both sides keep the scale."""
    theirs = hf_peft.get_peft_model(HFToy(copy.deepcopy(toy)), hf_config(ADALORA)).train()
    trained = [p for p in theirs.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in trained:
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    for step in range(ADALORA.total_step):
        for p in trained:
            p.grad = torch.randn(p.shape, generator=g)
        theirs.base_model.update_and_allocate(step)
    theirs.eval().save_pretrained(tmp_path / "peft")
    ours = load_adapter(copy.deepcopy(toy), tmp_path / "peft", name_map_inverse=from_hf)
    assert sum(m.r for m in svd_modules(ours).values()) == ADALORA.target_r * 4  # stored at reduced rank
    assert (ours(x) - theirs(x)).abs().max() < 1e-5
    assert len(peft_callbacks(ours)) == 1  # rank allocation can resume on the loaded adapter
    save_adapter(ours, tmp_path / "ours", name_map=to_hf)
    again = hf_peft.PeftModel.from_pretrained(HFToy(copy.deepcopy(toy)), tmp_path / "ours").eval()
    assert (again(x) - theirs(x)).abs().max() < 1e-5


def test_adalora_orthogonality_loss_matches_peft(toy, x):
    class WithLoss(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return SimpleNamespace(loss=self.inner(x).square().mean())

    theirs = hf_peft.get_peft_model(WithLoss(copy.deepcopy(toy)), hf_config(ADALORA))
    ours = apply_peft(WithLoss(copy.deepcopy(toy)), ADALORA)
    randomize_adapters(ours)
    copy_adapters_into_peft(ours, theirs)
    (callback,) = peft_callbacks(ours)
    assert isinstance(callback, TrainingCallback)
    ours_total = ours(x).loss + callback.extra_loss(ours)
    their_total = theirs.base_model(x).loss  # AdaLoraModel.forward adds peft's regulariser
    assert torch.allclose(ours_total, their_total, atol=1e-5) and callback.extra_loss(ours) > 0


# --- structure: keys, trainability, identity at init --------------------------------------------------------


ALL_CONFIGS = [
    *PARITY_CONFIGS,
    BottleneckConfig(target_modules=["o_proj", "mlp"], bottleneck_size=4, hidden_size=D),
    BottleneckConfig(
        target_modules=["attn"], bottleneck_size=4, activation="relu", hidden_size=D
    ),  # tuple output
    LoraConfig(target_modules=r"layers\.1\.attn\.(q|v)_proj", r=2, modules_to_save=["score"]),
]
ALL_IDS = [*PARITY_IDS, "bottleneck", "bottleneck-tuple", "regex+save"]


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=ALL_IDS)
def test_apply_keeps_base_keys_freezes_base_and_starts_as_identity(toy, x, config):
    base_state = {k: v.clone() for k, v in toy.state_dict().items()}
    expected = toy(x)
    model = apply_peft(copy.deepcopy(toy), config)
    state = model.state_dict()
    extra = set(state) - set(base_state)
    assert set(base_state) <= set(state)
    assert all(torch.equal(state[k], v) for k, v in base_state.items())
    adapter_keys = set(peft_state_dict(model))
    assert extra and extra <= adapter_keys
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == adapter_keys
    assert (model(x) - expected).abs().max() < 1e-6  # adapters start as the identity map
    report = trainable_parameters_report(model)
    assert report.trainable == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert report.total == sum(p.numel() for p in model.parameters()) and 0 < report.trainable_fraction < 1


def test_modules_to_save_stay_trainable_and_round_trip(toy, x, tmp_path):
    config = LoraConfig(target_modules=["q_proj"], r=2, modules_to_save=["score"])
    model = apply_peft(copy.deepcopy(toy), config)
    assert model.score.weight.requires_grad and not model.layers[0].mlp.up_proj.weight.requires_grad
    randomize_adapters(model)
    save_adapter(model, tmp_path, name_map=to_hf)
    theirs = hf_peft.PeftModel.from_pretrained(HFToy(copy.deepcopy(toy)), tmp_path).eval()
    assert (theirs(x) - model(x)).abs().max() < 1e-5
    again = load_adapter(copy.deepcopy(toy), tmp_path, name_map_inverse=from_hf)
    assert (again(x) - model(x)).abs().max() < 1e-6 and again.score.weight.requires_grad


def test_all_linear_skips_lm_head():
    model = nn.Sequential()
    model.add_module("body", nn.Linear(4, 4))
    model.add_module("lm_head", nn.Linear(4, 8))
    apply_peft(model, LoraConfig(target_modules="all-linear", r=2))
    assert set(peft_state_dict(model)) == {"body.lora_A.weight", "body.lora_B.weight"}


# --- merge / unmerge / unload / disable ---------------------------------------------------------------------


@pytest.mark.parametrize("config", PARITY_CONFIGS, ids=PARITY_IDS)
def test_merge_then_unmerge_is_exact(toy, x, config):
    model = apply_peft(copy.deepcopy(toy), config)
    randomize_adapters(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = model(x)
    merge_peft(model)
    assert any(not torch.equal(model.state_dict()[k], w) for k, w in weights.items())
    assert (model(x) - adapted).abs().max() < 1e-5
    unmerge_peft(model)
    for k, w in weights.items():
        assert torch.allclose(model.state_dict()[k], w, atol=1e-6), k
    assert (model(x) - adapted).abs().max() < 1e-5


def test_unload_leaves_plain_linears_with_the_adapted_function(toy, x):
    model = apply_peft(copy.deepcopy(toy), DORA)
    randomize_adapters(model)
    adapted = model(x)
    unload_peft(model, merge=True)
    assert type(model.layers[0].attn.q_proj) is nn.Linear
    assert set(model.state_dict()) == set(toy.state_dict())
    assert (model(x) - adapted).abs().max() < 1e-5


def test_adapters_disabled_runs_the_base_model(toy, x):
    model = apply_peft(copy.deepcopy(toy), LORA)
    apply_peft(model, BottleneckConfig(target_modules=["mlp"], bottleneck_size=4, hidden_size=D))
    randomize_adapters(model)
    adapted = model(x)
    with adapters_disabled(model):
        assert (model(x) - toy(x)).abs().max() < 1e-6
    assert torch.equal(model(x), adapted)
    merged = merge_peft(apply_peft(copy.deepcopy(toy), LORA))
    with pytest.raises(ValueError, match="unmerge_peft"), adapters_disabled(merged):
        pass


def test_bottleneck_round_trip_and_cannot_merge(toy, x, tmp_path):
    config = BottleneckConfig(
        target_modules=["attn", "mlp"], bottleneck_size=3, activation="silu", hidden_size=D
    )
    model = apply_peft(copy.deepcopy(toy), config)
    randomize_adapters(model)
    assert "layers.0.attn.adapter.down.weight" in peft_state_dict(model)
    with pytest.raises(ValueError, match="cannot be merged"):
        merge_peft(model)
    save_adapter(model, tmp_path, name_map=to_hf)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LMSMITH_BOTTLENECK"
    again = load_adapter(copy.deepcopy(toy), tmp_path, name_map_inverse=from_hf)
    assert (again(x) - model(x)).abs().max() < 1e-6
    unload_peft(again, merge=False)
    assert set(again.state_dict()) == set(toy.state_dict()) and (again(x) - toy(x)).abs().max() < 1e-6


# --- AdaLoRA inside a training loop -------------------------------------------------------------------------


def test_budget_schedule_is_cubic_between_tinit_and_final():
    config = AdaLoraConfig(target_modules=["q"], init_r=8, target_r=2, total_step=20, tinit=4, tfinal=6)
    budgets = [budget_schedule(s, 80, 20, config)[0] for s in range(20)]
    assert budgets[:5] == [80] * 5 and budgets[14:] == [20] * 6
    assert all(a >= b for a, b in pairwise(budgets)) and 20 < budgets[8] < 80


def test_adalora_callback_reduces_active_rank_in_a_training_loop(toy, x):
    config = AdaLoraConfig(
        target_modules=["q_proj", "v_proj", "up_proj"], init_r=6, target_r=2, total_step=12, tinit=2, tfinal=4
    )
    model = apply_peft(copy.deepcopy(toy), config).train()
    with torch.no_grad():  # non-zero singular values so the masking is visible
        for name, p in peft_state_dict(model).items():
            if name.endswith("lora_E"):
                p.fill_(0.1)
    callbacks = peft_callbacks(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    target = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(2))
    totals = []
    for step in range(config.total_step + 3):
        loss = F.mse_loss(model(x), target) + sum(cb.extra_loss(model) for cb in callbacks)
        loss.backward()
        optimizer.step()
        for cb in callbacks:
            cb.on_step_end(step, model)
        optimizer.zero_grad()
        totals.append(sum(active_ranks(model).values()))
    assert totals[0] == 6 * 6 and totals[-1] == 2 * 6  # 3 targets × 2 layers
    assert all(a >= b for a, b in pairwise(totals[config.tinit :]))


def test_adalora_callback_state_round_trips_through_a_checkpoint_tree(toy, x, tmp_path):
    from lmsmith.train import state as S

    config = AdaLoraConfig(target_modules=["q_proj", "v_proj"], init_r=4, target_r=2, total_step=6, tinit=1, tfinal=2)
    model = apply_peft(copy.deepcopy(toy), config).train()
    with torch.no_grad():  # non-zero singular values, so scores are non-zero
        for name, p in peft_state_dict(model).items():
            if name.endswith("lora_E"):
                p.fill_(0.1)
    callback = peft_callbacks(model)[0]
    saved = {}
    for step in range(5):  # step 2: scores accumulating; step 4 = total_step - tfinal: pattern frozen
        model(x).pow(2).mean().backward()
        callback.on_step_end(step, model)
        model.zero_grad()
        if step in (2, 4):
            S.write_tree(callback.state_dict(), tmp_path / f"{step}.json", tmp_path / f"{step}.safetensors")
            saved[step] = copy.deepcopy(callback.state_dict())
    assert saved[2]["sensitivity"] and saved[2]["uncertainty"] and saved[4]["rank_pattern"]
    assert not saved[4]["sensitivity"]  # reset after the final allocation
    for step, expected in saved.items():
        fresh = peft_callbacks(apply_peft(copy.deepcopy(toy), config))[0]
        fresh.load_state_dict(S.read_tree(tmp_path / f"{step}.json", tmp_path / f"{step}.safetensors"))
        got = fresh.state_dict()
        for part in ("sensitivity", "uncertainty", "rank_pattern"):
            want = expected[part] or {}
            assert (got[part] or {}).keys() == want.keys()
            assert all(torch.equal(got[part][k], t) for k, t in want.items())
    other = peft_callbacks(apply_peft(copy.deepcopy(toy), AdaLoraConfig(target_modules=["up_proj"], target_r=2,
                                                                        init_r=4, total_step=6, tinit=1, tfinal=2)))[0]
    with pytest.raises(ValueError, match="AdaLoRA state for modules .*q_proj"):
        other.load_state_dict(saved[2])


# --- prefix tuning ------------------------------------------------------------------------------------------


def test_prefix_encoder_layout():
    encoder = PrefixEncoder(
        num_layers=3, num_virtual_tokens=4, num_kv_heads=2, head_dim=5, encoder_hidden_size=7
    )
    kv = encoder()
    assert kv.shape == (3, 2, 4, 2, 5)
    pairs = encoder.key_values(batch_size=2)
    assert len(pairs) == 3 and pairs[1][0].shape == (2, 2, 4, 5)
    assert torch.equal(pairs[1][0][1, :, 2], kv[1, 0, 2]) and torch.equal(
        pairs[2][1][0, 1, 3], kv[2, 1, 3, 1]
    )


def test_prefix_tuning_on_the_lmsmith_transformer(tmp_path):
    from lmsmith.model.config import PRESETS
    from lmsmith.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny-llama"]).eval()
    ids = torch.randint(0, 512, (2, 6))
    plain = model(ids).logits
    apply_peft(model, PrefixConfig(num_virtual_tokens=3))
    prefix = prefix_for(model, batch_size=2)
    assert len(prefix) == 2 and prefix[0][0].shape == (2, 2, 3, 16)  # tiny-llama: 2 kv heads × 16
    logits = model(ids, prefix=prefix).logits
    assert logits.shape == plain.shape and (logits - plain).abs().max() > 1e-4
    logits.sum().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(peft_state_dict(model))
    with adapters_disabled(model):
        assert prefix_for(model, 2) is None
    save_adapter(model, tmp_path)
    fresh = Transformer(PRESETS["tiny-llama"]).eval()
    fresh.load_state_dict(model.state_dict(), strict=False)
    load_adapter(fresh, tmp_path)
    assert torch.allclose(fresh(ids, prefix=prefix_for(fresh, 2)).logits, logits, atol=1e-6)


# --- errors -------------------------------------------------------------------------------------------------


def test_target_matching_nothing_lists_available_names(toy):
    with pytest.raises(ValueError, match=r"matched no module.*layers\.0\.attn\.q_proj"):
        apply_peft(toy, LoraConfig(target_modules=["query"]))


@pytest.mark.parametrize(
    "make",
    [
        lambda: LoraConfig(target_modules=["q_proj"], r=0),
        lambda: LoraConfig(target_modules=["q_proj"], r=-2),
        lambda: AdaLoraConfig(target_modules=["q_proj"], total_step=10, init_r=0),
        lambda: AdaLoraConfig(target_modules=["q_proj"], total_step=10, init_r=2, target_r=4),
        lambda: AdaLoraConfig(target_modules=["q_proj"], total_step=10, tinit=6, tfinal=4),
        lambda: IA3Config(target_modules=["q_proj"], feedforward_modules=["down_proj"]),
        lambda: BottleneckConfig(target_modules=["mlp"], activation="swish"),
        lambda: LoraConfig(target_modules=[]),
        lambda: LoraConfig(target_modules=["q_proj"], lora_dropout=1.0),
    ],
)
def test_bad_configs_are_rejected(make):
    with pytest.raises(ValueError):
        make()


def test_non_linear_and_already_adapted_targets_are_rejected(toy):
    with pytest.raises(ValueError, match="adapts nn.Linear"):
        apply_peft(copy.deepcopy(toy), LoraConfig(target_modules=["mlp"]))
    model = apply_peft(copy.deepcopy(toy), LORA)
    with pytest.raises(ValueError, match="already has an adapter"):
        apply_peft(model, IA3Config(target_modules=["q_proj"]))


def test_loading_mismatched_shapes_names_the_tensor(toy, tmp_path):
    save_adapter(apply_peft(copy.deepcopy(toy), LORA), tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.layers.1.attn.v_proj.lora_B.weight"
    tensors[key] = torch.zeros(D + 1, 4)
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"layers\.1\.attn\.v_proj\.lora_B\.weight"):
        load_adapter(copy.deepcopy(toy), tmp_path)


def test_loading_bad_folders(toy, tmp_path):
    with pytest.raises(FileNotFoundError):
        load_adapter(toy, tmp_path / "missing")
    save_adapter(apply_peft(copy.deepcopy(toy), LORA), tmp_path)
    with pytest.raises(ValueError, match="no counterpart"):
        load_adapter(copy.deepcopy(toy), tmp_path, name_map_inverse=lambda n: "decoder." + n)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LOHA"}))
    with pytest.raises(ValueError, match="unsupported peft_type 'LOHA'"):
        load_adapter(copy.deepcopy(toy), tmp_path)


def test_save_refuses_mixed_adapter_types(toy, tmp_path):
    model = apply_peft(copy.deepcopy(toy), LORA)
    apply_peft(model, IA3Config(target_modules=["o_proj"]))
    with pytest.raises(ValueError, match="one adapter type per folder"):
        save_adapter(model, tmp_path)
