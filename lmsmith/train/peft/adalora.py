"""AdaLoRA (Zhang et al., 2023): SVD-form adapters whose rank budget moves to where it matters.

Each target gets ΔW = P Λ Q with P = `lora_B` (out, r), Λ = diag(`lora_E`) (r, 1), Q = `lora_A` (r, in).
While training, `RankAllocator` scores every singular triplet by sensitivity × uncertainty (EMAs of
|θ·∂L/∂θ|) and zeroes the lowest-scoring singular values until the total rank meets a cubic budget
schedule. The orthogonality regulariser keeps P and Q close to orthonormal so Λ behaves like singular
values. Tensor names, initialisation and arithmetic follow peft, so adapters convert both ways.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .base import AdaptedLinear
from .config import AdaLoraConfig

RANKNUM_EPS = 1e-5  # peft divides by (ranknum + 1e-5); kept so outputs match peft's


class SVDLinear(AdaptedLinear):
    """y = W x + b + (α / ranknum) · B (A ⊙ E) dropout(x).

    `ranknum` is the rank the adapter was created with (init_r); it stays fixed when singular values are
    masked, or when a trained adapter is loaded at a smaller rank, so the scale does not jump.
    """

    def __init__(
        self, base: nn.Linear, config: AdaLoraConfig, r: int | None = None, ranknum: int | None = None
    ):
        super().__init__(base)
        self.config = config
        self.r = config.init_r if r is None else r
        if self.r <= 0:
            raise ValueError(f"AdaLoRA rank must be a positive integer, got {self.r}")
        self.ranknum = float(config.init_r if ranknum is None else ranknum)
        self.scaling = config.lora_alpha if config.lora_alpha > 0 else float(self.r)
        factory = self.adapter_factory()
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features, **factory))  # right singular vectors
        self.lora_E = nn.Parameter(torch.empty(self.r, 1, **factory))  # singular values
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.r, **factory))  # left singular vectors
        self.lora_dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.reset_adapter()

    def reset_adapter(self) -> None:
        """Λ = 0 (the layer starts unchanged); P, Q small Gaussians so gradients reach Λ."""
        nn.init.zeros_(self.lora_E)
        nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
        nn.init.normal_(self.lora_B, mean=0.0, std=0.02)

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling / (self.ranknum + RANKNUM_EPS)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_forward(x)
        h = self.lora_dropout(x).to(self.lora_A.dtype)
        update = h @ (self.lora_A * self.lora_E).T @ self.lora_B.T  # (..., out)
        return result + (update * self.scaling / (self.ranknum + RANKNUM_EPS)).to(result.dtype)

    def active_rank(self) -> int:
        return int((self.lora_E != 0).sum())

    def _merge(self) -> None:
        self.weight += self.delta_weight().to(self.weight.dtype)

    def _unmerge(self) -> None:
        self.weight -= self.delta_weight().to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, ranknum={self.ranknum:g}"


# --- pure functions ---------------------------------------------------------------------------------


def budget_schedule(step: int, initial: int, target: int, config: AdaLoraConfig) -> tuple[int, bool]:
    """(total rank budget, whether to mask now) at optimizer step `step`, as in the paper/peft:
    warm-up at the full budget, a cubic decrease, then the final budget."""
    final_start = config.total_step - config.tfinal
    if step <= config.tinit:
        return initial, False
    if step > final_start:
        return target, True
    remaining = 1 - (step - config.tinit) / (final_start - config.tinit)
    return int((initial - target) * remaining**3 + target), step % config.deltaT == 0


def orthogonal_regularization(modules: Mapping[str, SVDLinear]) -> torch.Tensor:
    """Mean over every P and Q of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F (peft's regulariser)."""
    terms = []
    for module in modules.values():
        for gram in (module.lora_A @ module.lora_A.T, module.lora_B.T @ module.lora_B):
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            terms.append(torch.linalg.norm(gram - eye, ord="fro"))
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).mean()


def svd_modules(model: nn.Module) -> dict[str, SVDLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SVDLinear)}


def active_ranks(model: nn.Module) -> dict[str, int]:
    """Number of non-zero singular values per AdaLoRA module."""
    return {name: m.active_rank() for name, m in svd_modules(model).items()}


# --- rank allocation -------------------------------------------------------------------------------


class RankAllocator:
    """Importance scores and budget masking over a fixed set of SVDLinear modules."""

    def __init__(self, modules: Mapping[str, SVDLinear], config: AdaLoraConfig):
        if not modules:
            raise ValueError("RankAllocator needs at least one AdaLoRA (SVDLinear) module")
        self.modules = dict(modules)
        self.config = config
        self.initial_budget = sum(m.r for m in self.modules.values())
        self.target_budget = config.target_r * len(self.modules)
        self.rank_pattern: dict[str, torch.Tensor] | None = None  # per module: True = singular value kept
        self.reset_scores()

    def reset_scores(self) -> None:
        self.sensitivity: dict[tuple[str, str], torch.Tensor] = {}  # EMA of |θ·g|
        self.uncertainty: dict[tuple[str, str], torch.Tensor] = {}  # EMA of |(|θ·g|) − sensitivity|

    def update_importance(self) -> None:
        """Fold this step's |θ·∂L/∂θ| into the sensitivity and uncertainty EMAs (needs .grad)."""
        b1, b2 = self.config.beta1, self.config.beta2
        for name, module in self.modules.items():
            for part in ("lora_A", "lora_E", "lora_B"):
                p = getattr(module, part)
                if p.grad is None:
                    continue
                key = (name, part)
                with torch.no_grad():
                    ipt = (p * p.grad).abs()
                    sens = self.sensitivity.get(key, torch.zeros_like(p))
                    unc = self.uncertainty.get(key, torch.zeros_like(p))
                    self.sensitivity[key] = b1 * sens + (1 - b1) * ipt
                    self.uncertainty[key] = b2 * unc + (1 - b2) * (ipt - self.sensitivity[key]).abs()

    def _score(self, name: str, part: str) -> torch.Tensor:
        key = (name, part)
        if key not in self.sensitivity:
            return torch.zeros_like(getattr(self.modules[name], part))
        return self.sensitivity[key] * self.uncertainty[key]

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """Per module (r,): score(λᵢ) + mean score of row i of Q + mean score of column i of P."""
        scores = {}
        for name in self.modules:
            q_score = self._score(name, "lora_A").mean(dim=1)
            p_score = self._score(name, "lora_B").mean(dim=0)
            scores[name] = self._score(name, "lora_E").view(-1) + (q_score + p_score)
        return scores

    def mask_to_budget(self, budget: int) -> dict[str, torch.Tensor]:
        """Zero the singular values of the lowest-scoring triplets so that about `budget` remain."""
        scores = self.triplet_scores()
        num_to_mask = self.initial_budget - budget
        if num_to_mask <= 0:
            return {name: torch.ones_like(s, dtype=torch.bool) for name, s in scores.items()}
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=num_to_mask).values.item()
        pattern = {name: s > threshold for name, s in scores.items()}
        self.apply_rank_pattern(pattern)
        return pattern

    def apply_rank_pattern(self, pattern: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, keep in pattern.items():
                self.modules[name].lora_E.masked_fill_(
                    ~keep.view(-1, 1).to(self.modules[name].lora_E.device), 0.0
                )

    def state_dict(self) -> dict:
        """The scores and the frozen allocation, for exact resume. Keys are "module|part" strings
        (checkpoints store state as JSON + safetensors, which have no tuple keys)."""
        return {
            "sensitivity": {f"{n}|{p}": t for (n, p), t in self.sensitivity.items()},
            "uncertainty": {f"{n}|{p}": t for (n, p), t in self.uncertainty.items()},
            "rank_pattern": dict(self.rank_pattern) if self.rank_pattern is not None else None,
        }

    def load_state_dict(self, state: Mapping) -> None:
        names = {key.partition("|")[0] for part in ("sensitivity", "uncertainty") for key in state[part]}
        names |= set(state["rank_pattern"] or ())
        if not names <= set(self.modules):
            raise ValueError(f"AdaLoRA state for modules {sorted(names - set(self.modules))} that this model "
                             f"does not have (it has {sorted(self.modules)})")
        self.sensitivity = self._scores_from(state["sensitivity"])
        self.uncertainty = self._scores_from(state["uncertainty"])
        pattern = state["rank_pattern"]
        self.rank_pattern = None if pattern is None else {
            name: keep.to(device=self.modules[name].lora_E.device, dtype=torch.bool) for name, keep in pattern.items()}

    def _scores_from(self, saved: Mapping[str, torch.Tensor]) -> dict[tuple[str, str], torch.Tensor]:
        scores = {}
        for key, tensor in saved.items():
            name, _, part = key.partition("|")
            scores[(name, part)] = tensor.to(getattr(self.modules[name], part))
        return scores

    def update_and_allocate(self, step: int) -> int:
        """Run once per optimizer step, after `optimizer.step()` and before `zero_grad()` (the
        gradients are read). Returns the budget in force; the final allocation is frozen at
        `total_step - tfinal` and re-applied afterwards (the optimizer would revive masked values)."""
        final_start = self.config.total_step - self.config.tfinal
        if step < final_start:
            self.update_importance()
            budget, mask_now = budget_schedule(step, self.initial_budget, self.target_budget, self.config)
            if mask_now:
                self.rank_pattern = self.mask_to_budget(budget)
            return budget
        if step == final_start or self.rank_pattern is None:
            self.rank_pattern = self.mask_to_budget(self.target_budget)
            self.reset_scores()
        else:
            self.apply_rank_pattern(self.rank_pattern)
        return self.target_budget


class AdaLoraCallback:
    """The training-loop hook for AdaLoRA (see `callbacks.TrainingCallback`).

    `extra_loss` is the weighted orthogonality regulariser to add to the loss; `on_step_end` runs the
    rank allocator. `step` is the 0-based index of the optimizer step just taken (peft's convention).
    """

    def __init__(self, model: nn.Module, config: AdaLoraConfig | None = None):
        modules = svd_modules(model)
        if not modules:
            raise ValueError(
                "AdaLoraCallback: the model has no AdaLoRA modules; apply_peft(AdaLoraConfig) first"
            )
        configs = {m.config for m in modules.values()}
        if config is None and len(configs) != 1:
            raise ValueError(
                f"AdaLoRA modules carry {len(configs)} different configs; pass `config` explicitly"
            )
        self.config = config if config is not None else configs.pop()
        self.allocator = RankAllocator(modules, self.config)

    def on_step_end(self, step: int, model: nn.Module) -> None:
        self.allocator.update_and_allocate(step)

    def state_dict(self) -> dict:
        """Importance scores and rank pattern; the training checkpoint saves it so resume is exact."""
        return self.allocator.state_dict()

    def load_state_dict(self, state: Mapping) -> None:
        self.allocator.load_state_dict(state)

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        if self.config.orth_reg_weight == 0:
            return None
        return self.config.orth_reg_weight * orthogonal_regularization(self.allocator.modules)

    def __call__(self, step: int) -> None:
        self.allocator.update_and_allocate(step)
