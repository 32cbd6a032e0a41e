"""Robustness: perturbation suites, adversarial attacks, augmentation and adversarial training.

    from lmsmith.robustness import perturbation_suite, greedy_word_attack, suite_markdown
    report = perturbation_suite(model, tokenizer, texts, labels, perturbations=["typos"], severities=(0.1, 0.25))
    print(suite_markdown(report))

Names are imported lazily (as in lmsmith.train and lmsmith.evaluate): lmsmith.train imports the
augmentation and adversarial settings, and the report module imports lmsmith.api. See docs/robustness.md.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ADVERSARIAL_METHODS": "adversarial", "AdversarialObjective": "adversarial",
    "AdversarialSettings": "adversarial", "ATTACKS": "attacks", "AttackExample": "attacks",
    "AttackReport": "attacks", "attack": "attacks", "attack_markdown": "attacks",
    "greedy_word_attack": "attacks", "hotflip_attack": "attacks", "AugmentCounts": "augmentation",
    "AugmentSettings": "augmentation", "augment": "augmentation", "augment_train_split": "augmentation",
    "augment_with": "augmentation", "Victim": "classify", "check_classifier": "classify",
    "PERTURBATIONS": "perturbations", "SUITES": "perturbations", "get_perturbation": "perturbations",
    "perturb": "perturbations", "perturbation_names": "perturbations", "register_perturbation": "perturbations",
    "resolve_perturbations": "perturbations", "RobustnessResult": "report", "load_eval_data": "report",
    "robustness_report": "report", "SuiteReport": "suite", "SuiteRow": "suite", "perturb_all": "suite",
    "perturbation_suite": "suite", "save_suite_plot": "suite", "suite_json": "suite", "suite_markdown": "suite",
}
__all__ = [
    "ADVERSARIAL_METHODS", "ATTACKS", "PERTURBATIONS", "SUITES", "AdversarialObjective", "AdversarialSettings",
    "AttackExample", "AttackReport", "AugmentCounts", "AugmentSettings", "RobustnessResult", "SuiteReport",
    "SuiteRow", "Victim", "attack", "attack_markdown", "augment", "augment_train_split", "augment_with",
    "check_classifier", "get_perturbation", "greedy_word_attack", "hotflip_attack", "load_eval_data", "perturb",
    "perturb_all", "perturbation_names", "perturbation_suite", "register_perturbation", "resolve_perturbations",
    "robustness_report", "save_suite_plot", "suite_json", "suite_markdown",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lmsmith.robustness' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
