"""PEFT on a Pivot MLLM: LoRA / DoRA / rsLoRA on some parts while the other tunable parts train in full.

The peers' recipe for PIVOT on one 24-80 GB GPU (ms-swift `--train_type lora --freeze_vit false`, LLaMA-Factory
`finetuning_type: lora` + `freeze_vision_tower: false`): adapters on the LLM, the vision tower trained in full at its
own learning rate. Here:

- `lora_config_from_model_args` turns TRL's `ModelConfig` keys into a `LoraConfig` with TRL's own `get_peft_config`
  and scopes `lora_target_modules` to the parts named by `lora_target_parts` (default: the language model), so that
  `all-linear` or `q_proj` does not also hit the vision tower's layers of the same name;
- `complete_lora_config` (the trainers, for any `peft_config` they are given) adds every part of `tunable_parts`
  that carries no adapter to PEFT's `modules_to_save`: PEFT then trains a copy of it in full and keeps the original
  frozen. The adapter file holds the adapter and those copies (PEFT's format, `PeftModel.from_pretrained` on the
  base checkpoint), and with the adapters disabled the model is exactly the starting network, which is what makes
  the adapter-disabled policy a correct DPO reference even while the tower trains;
- `restore_frozen` re-freezes, after wrapping, what was frozen before it (tower blocks above the feature layer,
  Stage 3's reused projector layers): PEFT marks every parameter of a `modules_to_save` copy trainable.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re

import torch

from ..configs import TUNABLE_PARTS, RecipeConfigError


logger = logging.getLogger(__name__)

# Module-name prefixes of the parts inside `PivotForConditionalGeneration` (`lm_head` belongs to the language model).
PART_PREFIXES = {
    "vision_tower": ("model.vision_tower",),
    "projector": ("model.multi_modal_projector",),
    "language_model": ("model.language_model", "lm_head"),
}
# What `modules_to_save` names for a part trained in full beside the adapters (PEFT matches name suffixes).
FULL_PART_MODULES = {"vision_tower": "vision_tower", "projector": "multi_modal_projector"}
_ADAPTER_MARKERS = (".lora_A.", ".lora_B.", ".lora_magnitude_vector.", ".lora_embedding_A.", ".lora_embedding_B.")


def _part_of_module(name: str) -> str | None:
    for part, prefixes in PART_PREFIXES.items():
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return part
    return None


def _target_names(lora_target_modules) -> list[str] | str:
    if lora_target_modules is None:
        return "all-linear"
    if isinstance(lora_target_modules, str):
        return lora_target_modules
    names = [str(n) for n in lora_target_modules]
    return "all-linear" if names == ["all-linear"] else names


def scoped_target_modules(model, lora_target_modules, target_parts) -> list[str]:
    """Full names of the linear modules of `target_parts` that `lora_target_modules` selects.

    `lora_target_modules` has PEFT's meaning (`all-linear`, a list of module-name suffixes, or one regex matched
    against the full name); `lm_head` is only adapted when named explicitly, as in PEFT's `all-linear`.
    """
    targets = _target_names(lora_target_modules)
    chosen = []
    for name, module in model.named_modules():
        part = _part_of_module(name)
        if part not in target_parts or not isinstance(module, torch.nn.Linear):
            continue
        if targets == "all-linear":
            keep = name != "lm_head"
        elif isinstance(targets, str):
            keep = re.fullmatch(targets, name) is not None
        else:
            keep = any(name == t or name.endswith("." + t) for t in targets)
        if keep:
            chosen.append(name)
    if not chosen:
        raise RecipeConfigError(
            f"lora_target_modules={lora_target_modules!r} selects no linear layer of lora_target_parts="
            f"{list(target_parts)}. Fix: use `all-linear`, or module names of those parts (the language model's "
            "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; the tower's q_proj, k_proj, v_proj, "
            "out_proj, fc1, fc2)."
        )
    return chosen


def lora_config_from_model_args(model_args, model):
    """TRL's `get_peft_config(model_args)` with its `target_modules` scoped to `model_args.lora_target_parts`;
    None when `use_peft` is off."""
    from trl import get_peft_config

    config = get_peft_config(model_args)
    if config is None:
        return None
    config.target_modules = scoped_target_modules(model, model_args.lora_target_modules, model_args.lora_target_parts)
    return config


def adapted_parts(model, peft_config) -> set[str]:
    """The parts in which `peft_config` would put adapters (PEFT's own name matching, before wrapping)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    targets = peft_config.target_modules
    all_linear = isinstance(targets, str) and targets.lower() == "all-linear"
    parts = set()
    for name, module in model.named_modules():
        part = _part_of_module(name)
        if part is None or part in parts:
            continue
        if all_linear:
            # PEFT expands `all-linear` at wrapping time: every linear layer except the output layer.
            hit = isinstance(module, torch.nn.Linear) and name != "lm_head"
        else:
            hit = check_target_module_exists(peft_config, name)
        if hit:
            parts.add(part)
    return parts


def complete_lora_config(model, peft_config, tunable_parts):
    """A copy of `peft_config` in which every tunable part without adapters trains in full (`modules_to_save`).

    Returns `(config, adapted, full)`: the parts carrying adapters and the parts trained in full beside them.
    Errors: an adapter on a part outside `tunable_parts` (it would train although the recipe freezes it), or a part
    that is both adapted and in `modules_to_save`.
    """
    adapted = adapted_parts(model, peft_config)
    frozen_adapted = sorted(adapted - set(tunable_parts))
    if frozen_adapted:
        raise RecipeConfigError(
            f"The LoRA config puts adapters on {frozen_adapted}, which tunable_parts={list(tunable_parts)} keeps "
            "frozen. Fix: add them to `tunable_parts`, or narrow `lora_target_parts` / `lora_target_modules` (e.g. "
            "`lora_target_parts: [language_model]`)."
        )
    full = [p for p in TUNABLE_PARTS if p in tunable_parts and p not in adapted]
    config = copy.deepcopy(peft_config)
    modules = list(config.modules_to_save or [])
    for part in full:
        if part in FULL_PART_MODULES and FULL_PART_MODULES[part] not in modules:
            modules.append(FULL_PART_MODULES[part])
    if "language_model" in full:
        raise RecipeConfigError(
            "The language model is in tunable_parts but the LoRA config puts no adapter on it, and PEFT cannot train "
            "a whole LLM beside adapters. Fix: put LoRA on it (`lora_target_parts` includes language_model), or "
            "remove it from `tunable_parts`, or train without PEFT (`use_peft: false`)."
        )
    both = sorted(p for p in adapted if FULL_PART_MODULES.get(p) in modules)
    if both:
        raise RecipeConfigError(
            f"{both} carry LoRA adapters and are also listed in `lora_modules_to_save` (trained in full). Fix: "
            "choose one: drop them from `lora_modules_to_save` or from `lora_target_parts`."
        )
    config.modules_to_save = modules or None
    return config, sorted(adapted), [p for p in full if p != "language_model"]


def base_parameter_name(peft_name: str) -> str:
    """The name in the unwrapped Pivot model of the parameter that `peft_name` (a PeftModel parameter) adapts or
    copies: `base_model.model.` dropped, a `modules_to_save` copy mapped to its original, an adapter weight mapped to
    its base layer's weight."""
    name = re.sub(r"^base_model\.model\.", "", peft_name)
    name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name).replace(".original_module.", ".")
    name = name.replace(".base_layer.", ".")
    for marker in _ADAPTER_MARKERS:
        if marker in name:
            return name.split(marker)[0] + ".weight"
    return name


def restore_frozen(peft_model, requires_grad_before: dict[str, bool]) -> list[str]:
    """Freeze the adapter weights and `modules_to_save` copies whose base parameter was frozen before wrapping.

    Returns the names frozen. `requires_grad_before` maps the unwrapped model's parameter names to their flags.
    """
    frozen = []
    for name, param in peft_model.named_parameters():
        if param.requires_grad and requires_grad_before.get(base_parameter_name(name), True) is False:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def restore_full_part_dtypes(peft_model, dtypes_before: dict[str, torch.dtype]) -> list[str]:
    """Give the trained copies of the parts trained in full (`modules_to_save`) back the dtype their originals had.

    Under QLoRA, TRL casts every trainable weight to bf16 after wrapping (QLoRA's recipe for adapter weights); for a
    vision tower trained in full at lr ~1e-6 that would round its updates away. Returns the names cast back.
    """
    restored = []
    for name, param in peft_model.named_parameters():
        if ".modules_to_save." not in name:
            continue
        dtype = dtypes_before.get(base_parameter_name(name))
        if dtype is not None and param.dtype != dtype:
            param.data = param.data.to(dtype)
            restored.append(name)
    return restored


@contextlib.contextmanager
def preserved_requires_grad(model):
    """Keep every `requires_grad` flag of `model` as it is across the block.

    PEFT's `disable_adapter()` (TRL's reference pass) re-enables adapters on exit by marking every weight of the
    active adapter and of each `modules_to_save` copy trainable, which would un-freeze the tower blocks above the
    feature layer and Stage 3's frozen projector layers.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for param, flag in flags:
            if param.requires_grad != flag:
                param.requires_grad_(flag)


def describe_reference(adapted, full) -> str:
    """What the adapter-disabled policy is as a DPO reference, for the log."""
    if full:
        return (
            f"the policy with its adapters disabled: LoRA off on {adapted}, and {full} (trained in full) run as the "
            "frozen originals PEFT keeps beside their trained copies (modules_to_save), so the reference is the "
            "starting network exactly, without a second model"
        )
    return (
        f"the policy with its adapters disabled (nothing outside the adapters on {adapted} trains, so the base "
        "weights are the starting network)"
    )


def peft_summary(model) -> dict | None:
    """`{"type", "r", "lora_alpha", "use_dora", "use_rslora", "modules_to_save", "adapted_parts"}` of a PEFT model's
    active adapter (None for a plain model), for `pivot_run.json` and the model cards."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        return None
    config = configs.get("default") or next(iter(configs.values()))
    targets = config.target_modules
    target_names = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
    parts = None
    if isinstance(target_names, list):
        parts = sorted({_part_of_module(n) for n in target_names} - {None})
    return {
        "type": str(getattr(config.peft_type, "value", config.peft_type)),
        "r": getattr(config, "r", None),
        "lora_alpha": getattr(config, "lora_alpha", None),
        "use_dora": bool(getattr(config, "use_dora", False)),
        "use_rslora": bool(getattr(config, "use_rslora", False)),
        "modules_to_save": list(config.modules_to_save or []),
        "adapted_parts": parts,
    }


__all__ = [
    "FULL_PART_MODULES",
    "PART_PREFIXES",
    "adapted_parts",
    "base_parameter_name",
    "complete_lora_config",
    "describe_reference",
    "lora_config_from_model_args",
    "peft_summary",
    "preserved_requires_grad",
    "restore_frozen",
    "restore_full_part_dtypes",
    "scoped_target_modules",
]
