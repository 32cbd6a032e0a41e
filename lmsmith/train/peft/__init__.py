"""Parameter-efficient fine-tuning: LoRA / rsLoRA / DoRA, (IA)^3, AdaLoRA, Houlsby adapters, prefix tuning.

Adapters wrap modules *by name* on any nn.Module and keep the base state-dict keys (`<name>.weight`,
`<name>.bias`); adapter tensors are extra keys such as `<name>.lora_A.weight`.

    model = apply_peft(model, LoraConfig(target_modules=["q_proj", "v_proj"], r=8, lora_alpha=16))
    callbacks = peft_callbacks(model)          # AdaLoRA's rank allocator + orthogonality loss
    ...train...
    save_adapter(model, "out/adapter", name_map=family_name_map)   # peft's folder format
    merge_peft(model)                          # or unload_peft(model) for plain nn.Linear layers
"""

from .adalora import (
    AdaLoraCallback,
    RankAllocator,
    SVDLinear,
    active_ranks,
    budget_schedule,
    orthogonal_regularization,
    svd_modules,
)
from .base import AdaptedLinear, AdapterModule
from .bottleneck import BottleneckAdapter
from .callbacks import TrainingCallback
from .config import AdaLoraConfig, BottleneckConfig, IA3Config, LoraConfig, PeftConfig, PrefixConfig
from .core import (
    ParameterReport,
    adapters_disabled,
    apply_peft,
    merge_peft,
    peft_callbacks,
    peft_named_parameters,
    peft_state_dict,
    trainable_parameters_report,
    unload_peft,
    unmerge_peft,
)
from .folder import load_adapter, save_adapter
from .ia3 import IA3Linear
from .lora import LoRALinear, dora_weight_norm, lora_scaling
from .prefix import PrefixEncoder, prefix_for
from .targets import find_targets, name_matches

__all__ = [
    "AdaLoraCallback",
    "AdaLoraConfig",
    "AdaptedLinear",
    "AdapterModule",
    "BottleneckAdapter",
    "BottleneckConfig",
    "IA3Config",
    "IA3Linear",
    "LoRALinear",
    "LoraConfig",
    "ParameterReport",
    "PeftConfig",
    "PrefixConfig",
    "PrefixEncoder",
    "RankAllocator",
    "SVDLinear",
    "TrainingCallback",
    "active_ranks",
    "adapters_disabled",
    "apply_peft",
    "budget_schedule",
    "dora_weight_norm",
    "find_targets",
    "load_adapter",
    "lora_scaling",
    "merge_peft",
    "name_matches",
    "orthogonal_regularization",
    "peft_callbacks",
    "peft_named_parameters",
    "peft_state_dict",
    "prefix_for",
    "save_adapter",
    "svd_modules",
    "trainable_parameters_report",
    "unload_peft",
    "unmerge_peft",
]
