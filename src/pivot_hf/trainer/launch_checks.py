"""The launcher and the recipe must agree before any weight loads: DeepSpeed / `--cpu` pitfalls named with their fix.

A shipped accelerate config (accelerate_configs/*.yaml) is written for GPUs: `mixed_precision: bf16`, `use_cpu: false`.
Launched as it is against a recipe with `bf16: false`, or on a machine without CUDA, the run loads the data and both
models and then dies inside DeepSpeed (transformers' "DeepSpeed config values that mismatch TrainingArguments",
DeepSpeed's `train_batch_size` assertion). `accelerate launch --cpu` with a DeepSpeed, FSDP or multi-GPU config
silently runs one plain process instead. A DeepSpeed JSON (`deepspeed_config_file`) whose own batch / clipping values
are neither "auto" nor the recipe's fails the same late way. Each case is refused here, from the environment
`accelerate launch` sets (`ACCELERATE_USE_DEEPSPEED`, `ACCELERATE_MIXED_PRECISION`, `ACCELERATE_USE_CPU`) and, for
`--cpu`, the launcher's own command line (the only place the dropped config is still visible).
"""

from __future__ import annotations

import os

from ..configs import RecipeConfigError


_CPU_LAUNCH = (
    "On a CPU machine launch the config unchanged with `--num_processes N --mixed_precision no` and set "
    "`use_cpu: true` in the recipe (DeepSpeed then runs on its CPU accelerator over gloo)."
)


def _true(value: str | None) -> bool:
    return str(value).lower() in ("1", "true", "yes")


def check_launch(args) -> None:
    """Refuse launcher/recipe combinations that would fail (or silently change the run) after the weights loaded.

    Args:
        args: the training arguments (`bf16`, `fp16`, `use_cpu`).

    Raises:
        RecipeConfigError: the accelerate config's `mixed_precision` disagrees with the recipe's `bf16`/`fp16` under
            DeepSpeed; DeepSpeed on a machine without CUDA without `use_cpu: true`; `accelerate launch --cpu` with a
            DeepSpeed, FSDP or multi-GPU config (which accelerate drops).
    """
    if _true(os.environ.get("ACCELERATE_USE_DEEPSPEED")):
        _check_deepspeed_precision(args)
        _check_deepspeed_batch(args)
        _check_deepspeed_device(args)
    elif _true(os.environ.get("ACCELERATE_USE_CPU")) and not _true(os.environ.get("ACCELERATE_USE_FSDP")):
        _check_cpu_flag_kept_config()


def _deepspeed_json_disagrees(recipe: str) -> str | None:
    """The precision a DeepSpeed JSON (`deepspeed_config_file`) fixes against the recipe's, or None where it agrees
    or leaves it open: transformers compares only the `bf16`/`fp16` `enabled` values the JSON sets (not "auto")."""
    import json

    with open(os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"], encoding="utf-8") as f:
        config = json.load(f)
    for key in ("bf16", "fp16"):
        enabled = (config.get(key) or {}).get("enabled", "auto")
        if enabled != "auto" and bool(enabled) != (recipe == key):
            return key if enabled else "no"
    return None


def _check_deepspeed_precision(args) -> None:
    recipe = "bf16" if getattr(args, "bf16", False) else "fp16" if getattr(args, "fp16", False) else "no"
    ds_json = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if os.path.isfile(ds_json):
        launcher = _deepspeed_json_disagrees(recipe) or recipe
        fix_launch = f'set `"enabled": "auto"` in the bf16/fp16 blocks of {ds_json}'
    else:  # accelerate writes `mixed_precision` into the DeepSpeed config it builds
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
        fix_launch = f"launch with `--mixed_precision {recipe}`"
    if launcher != recipe:
        fix_recipe = f"`{launcher}: true` in the recipe" if launcher != "no" else "`bf16: false` and `fp16: false`"
        raise RecipeConfigError(
            f"The accelerate config launches DeepSpeed with `mixed_precision: {launcher}` but the recipe trains with "
            f"{'`' + recipe + ': true`' if recipe != 'no' else '`bf16: false`'}; DeepSpeed would refuse the mismatch "
            f"after both models loaded. Fix: {fix_launch}, or set {fix_recipe}. " + _CPU_LAUNCH
        )


def _check_deepspeed_batch(args) -> None:
    """A DeepSpeed JSON's own batch / clipping values must be "auto" or the recipe's: transformers fills "auto" from
    the recipe, but a fixed value that disagrees ends in DeepSpeed's `train_batch_size` assertion (or transformers'
    mismatch error) after both models loaded."""
    import json

    ds_json = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
    if not os.path.isfile(ds_json):
        return  # accelerate builds the config itself from the recipe's values
    with open(ds_json, encoding="utf-8") as f:
        config = json.load(f)
    micro = getattr(args, "per_device_train_batch_size", None)
    accumulation = getattr(args, "gradient_accumulation_steps", None)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    expected = {
        "train_micro_batch_size_per_gpu": ("per_device_train_batch_size", micro),
        "gradient_accumulation_steps": ("gradient_accumulation_steps", accumulation),
        "train_batch_size": (
            f"per_device_train_batch_size x gradient_accumulation_steps x {world} processes",
            None if micro is None or accumulation is None else micro * accumulation * world,
        ),
        "gradient_clipping": ("max_grad_norm", getattr(args, "max_grad_norm", None)),
    }
    problems = [
        f"`{key}: {config[key]}` (recipe: {source} = {value})"
        for key, (source, value) in expected.items()
        if value is not None and key in config and config[key] != "auto" and config[key] != value
    ]
    if problems:
        raise RecipeConfigError(
            f"The DeepSpeed config {ds_json} fixes values the recipe sets otherwise: {'; '.join(problems)}; DeepSpeed "
            'would refuse the mismatch after both models loaded. Fix: set these keys to "auto" in the JSON (the '
            "recipe's values are then used), or set the recipe's keys to the JSON's values."
        )


def _check_deepspeed_device(args) -> None:
    import torch

    if torch.cuda.is_available() or getattr(args, "use_cpu", False):
        return
    raise RecipeConfigError(
        "DeepSpeed was launched on a machine without CUDA but the recipe has `use_cpu: false`: accelerate would count "
        "one process while DeepSpeed counts every rank, and DeepSpeed's `train_batch_size` assertion fails after the "
        "models loaded. Fix: set `use_cpu: true` (`--use_cpu true`). " + _CPU_LAUNCH
    )


def _launcher_argv() -> list[str]:
    """The command line of the `accelerate launch` process that started this one ([] if there is none)."""
    try:
        import psutil

        argv = psutil.Process().parent().cmdline()
    except Exception:  # noqa: BLE001 - no parent information (containers, permissions): nothing to check
        return []
    # `accelerate launch ...`, `accelerate-launch ...` (console scripts) or `python -m accelerate.commands.launch ...`
    scripts = {os.path.basename(a) for a in argv[:2]}
    if ("accelerate" in scripts and "launch" in argv) or "accelerate-launch" in scripts:
        return argv
    if "accelerate.commands.launch" in argv:
        return argv
    return []


def _config_file_of(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config_file" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config_file="):
            return arg.split("=", 1)[1]
    from accelerate.commands.config.config_args import default_config_file

    return default_config_file if os.path.isfile(default_config_file) else None


def _check_cpu_flag_kept_config() -> None:
    argv = _launcher_argv()
    if "--cpu" not in argv:
        return
    path = _config_file_of(argv)
    if not path or not os.path.isfile(path):
        return
    import yaml

    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f)  # accelerate's JSON configs are YAML too
    distributed = str((config or {}).get("distributed_type", "NO")).upper()
    if distributed in ("DEEPSPEED", "FSDP", "MULTI_GPU"):
        raise RecipeConfigError(
            f"`accelerate launch --cpu` with {path} (distributed_type: {distributed}) drops that config: accelerate "
            "would run this script as one plain process, without DeepSpeed/FSDP/DDP. Fix: remove `--cpu` from the "
            "launch line. " + _CPU_LAUNCH
        )


__all__ = ["check_launch"]
