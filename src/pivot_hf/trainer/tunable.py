"""Tunable parts of the Pivot MLLM: which weights train, at which learning rate, and proof that they changed.

`TunablePartsMixin` is mixed into both pivot trainers ahead of TRL's trainer:
- at construction, `args.tunable_parts` becomes `requires_grad` (vision-tower weights that no gradient can reach from
  the feature layer stay frozen, or DDP would wait for their gradients forever); with a `peft_config` the tunable
  parts without adapters are added to PEFT's `modules_to_save` (`adapters.complete_lora_config`), and once the parent
  has wrapped the model what was frozen is frozen again and the trainable split of the wrapped model is logged;
- `create_optimizer` builds one parameter group per part with its own learning rate. The optimizer is always built by
  the Trainer (never by DeepSpeed from its JSON), so the groups survive DDP, ZeRO-2/3 and FSDP2; the LR scheduler
  scales each group's own initial LR. This is where LLaVA-NeXT's separate vision LR was silently lost;
- after `train`, a checksum per trainable tensor is compared with the one taken before training: a vision tower that
  was meant to train and did not change is an error, any other unchanged part a warning.
"""

from __future__ import annotations

import copy
import logging
import os
import re

import torch

from ..configs import TUNABLE_PARTS, RecipeConfigError, check_part_lrs, part_learning_rates
from ..inherited_keys import resolved_defaults
from .data_checks import check_vision_data_needs_vlm, dataset_has_images


logger = logging.getLogger(__name__)

_PART_PATTERNS = {
    "vision_tower": re.compile(r"(^|\.)vision_tower\."),
    "projector": re.compile(r"(^|\.)multi_modal_projector\."),
    "language_model": re.compile(r"(^|\.)(language_model|lm_head)\."),
}


def part_of(name: str) -> str | None:
    """`vision_tower`, `projector` or `language_model` for a parameter name (wrapper prefixes allowed)."""
    for part, pattern in _PART_PATTERNS.items():
        if pattern.search(name):
            return part
    return None


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 partitions leave p.numel() == 0


def apply_tunable_parts(model, tunable_parts: list[str]) -> dict[str, dict[str, int]]:
    """Set `requires_grad` from `tunable_parts`; returns `{part: {"total", "trainable"}}`."""
    unknown = [p for p in tunable_parts if p not in TUNABLE_PARTS]
    if unknown:
        raise RecipeConfigError(f"Unknown tunable_parts {unknown}. Fix: choose from {list(TUNABLE_PARTS)}.")
    # A text-only LLM (TRL's trainers take one too) has no vision tower: all its weights are the language model's.
    unreached_names = getattr(model, "unreached_vision_parameter_names", None)
    unreached = set(unreached_names()) if unreached_names is not None and "vision_tower" in tunable_parts else set()
    for name, param in model.named_parameters():
        part = part_of(name) or "language_model"
        param.requires_grad_(part in tunable_parts and name not in unreached)
    return trainable_split(model)


def trainable_split(model) -> dict[str, dict[str, int]]:
    split = {part: {"total": 0, "trainable": 0} for part in TUNABLE_PARTS}
    for name, param in model.named_parameters():
        if ".original_module." in name:
            continue  # PEFT's frozen copy of a part trained in full (modules_to_save): not counted twice
        part = part_of(name) or "language_model"
        split[part]["total"] += _numel(param)
        if param.requires_grad:
            split[part]["trainable"] += _numel(param)
    return split


def _local(param: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The locally held values of a parameter and whether they are a shard (ZeRO-3 partition / FSDP2 DTensor)."""
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor, True
    if hasattr(param, "to_local"):
        return param.to_local(), True
    return param, False


_CHECKSUM_CHUNK = 1 << 22


@torch.no_grad()
def checksums(named_params: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """`(sum, sum of squares, sum of |x|)` in float64 per tensor; shards are summed across ranks (padding is zero).

    One tiny vector per tensor instead of a copy of the weights: a whole 1.5B-parameter model costs kilobytes. The
    float64 sums run over chunks of `_CHECKSUM_CHUNK` elements, so the transient memory is a few chunk copies, not
    three float64 copies of the largest tensor (Qwen2.5's embedding: 3.3 GB).
    """
    stats, sharded = {}, []
    for name, param in named_params:
        local, is_shard = _local(param)
        total = torch.zeros(3, dtype=torch.float64, device=local.device)
        for chunk in local.detach().reshape(-1).split(_CHECKSUM_CHUNK):
            x = chunk.to(torch.float64)
            total += torch.stack([x.sum(), x.square().sum(), x.abs().sum()])
        stats[name] = total
        if is_shard:
            sharded.append(name)
    if sharded and torch.distributed.is_available() and torch.distributed.is_initialized():
        packed = torch.stack([stats[n] for n in sharded])
        torch.distributed.all_reduce(packed)
        for n, row in zip(sharded, packed):
            stats[n] = row
    return {n: s.cpu() for n, s in stats.items()}


def check_distributed_config(args) -> None:
    """DeepSpeed must not build the optimizer or the LR scheduler: either drops the per-part learning rates (an
    `optimizer` block builds one group; a `scheduler` block such as WarmupLR sets one LR on every group each step).
    The launcher's own settings are checked against the recipe first (`launch_checks.check_launch`)."""
    from .launch_checks import check_launch

    check_launch(args)
    plugin = getattr(args, "deepspeed_plugin", None)
    ds_config = getattr(plugin, "deepspeed_config", None)
    if ds_config is None:
        ds_config = getattr(args, "deepspeed", None) or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if isinstance(ds_config, str) and os.path.isfile(ds_config):
            import json

            with open(ds_config, encoding="utf-8") as f:
                ds_config = json.load(f)
    ds_config = ds_config if isinstance(ds_config, dict) else {}
    fsdp_config = getattr(args, "fsdp_config", None) or {}
    uses_fsdp = bool(getattr(args, "fsdp", None)) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    version = str(fsdp_config.get("version", os.environ.get("FSDP_VERSION", "1")))
    orig_params = str(fsdp_config.get("use_orig_params", os.environ.get("FSDP_USE_ORIG_PARAMS", "true"))).lower()
    if uses_fsdp and version != "2" and orig_params == "false":
        raise RecipeConfigError(
            "FSDP (version 1) with `use_orig_params: false` flattens all parameters into one, so the per-part "
            "parameter groups (vision_tower_lr, projector_lr) cannot exist. Fix: use FSDP2 "
            "(accelerate_configs/fsdp2.yaml) or set `fsdp_use_orig_params: true`."
        )
    for block in ("optimizer", "scheduler"):
        if block in ds_config:
            raise RecipeConfigError(
                f"The DeepSpeed config defines a `{block}` block, so DeepSpeed would build the {block} and override "
                "the per-part learning rates (vision_tower_lr, projector_lr: one LR on every parameter group). Fix: "
                f"remove the `{block}` block from the DeepSpeed JSON (accelerate_configs/ never set one); the Trainer "
                "then builds it from the recipe (`lr_scheduler_type`, `warmup_ratio`)."
            )


def as_pivot_config(args, pivot_cls):
    """`args` as `pivot_cls` (a Pivot config subclassing a TRL config), so a Pivot trainer takes what its parent takes.

    A plain TRL config (`DPOConfig`, `SFTConfig`, `GRPOConfig`, or `TrainingArguments` where TRL converts it) gets
    the Pivot fields at their defaults (all parts train, no per-part LR) on a shallow copy: every value TRL already
    resolved stays as it is (re-running TRL's `__post_init__` is not idempotent, e.g. GRPO's generation batch), and
    the caller's object is left untouched. The Pivot fields are then validated as a Pivot config would be.
    """
    import dataclasses

    from transformers import TrainingArguments

    if args is None:
        return args
    if isinstance(args, pivot_cls):
        # A copy: what the trainer or TRL resolve in place on their config (a tracker that is not installed dropped
        # from `report_to`, TRL's `ddp_find_unused_parameters` for vision models, `gradient_checkpointing_kwargs`
        # under PEFT + ZeRO-3) stays off the caller's object, as it does for a plain TRL config below.
        return _own_containers(copy.copy(args))
    trl_cls = next(
        c for c in pivot_cls.__mro__[1:] if issubclass(c, TrainingArguments) and c.__module__.startswith("trl")
    )
    if not isinstance(args, trl_cls):
        if trl_cls.__name__ != "SFTConfig" or not isinstance(args, TrainingArguments):
            return args  # the parent refuses it
        # TRL's SFTTrainer converts plain `TrainingArguments` through `to_dict`; do the same, into the Pivot class.
        kwargs = args.to_dict()
        kwargs["hub_token"] = args.hub_token  # to_dict hides it
        names = {f.name for f in dataclasses.fields(pivot_cls) if f.init}
        return pivot_cls(**{k: v for k, v in kwargs.items() if k in names})
    converted = copy.copy(args)
    converted.__class__ = pivot_cls
    for f in dataclasses.fields(pivot_cls):
        if f.init and not hasattr(converted, f.name):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            setattr(converted, f.name, default)
    # `args` already ran TRL's `__post_init__`, which resolves some defaults to derived values (DPOConfig's
    # `pad_to_multiple_of="auto"` -> None on CPU/GPU). Those are still the user's defaults: a TRL config built with
    # only the same placement keys says what each default resolved to, and the key check accepts that value too.
    with resolved_defaults(_resolved_defaults(trl_cls, args)):
        converted._pivot_post_init()
    return _own_containers(converted)


def _own_containers(args):
    """`args` (a shallow copy) with its own copies of the dict / list / set values, which TRL edits in place."""
    for name, value in vars(args).items():
        if isinstance(value, (dict, list, set)):
            setattr(args, name, copy.deepcopy(value))
    return args


def _resolved_defaults(trl_cls, args) -> dict:
    """Field values of a `trl_cls` built with defaults (and `args`' placement keys), after its `__post_init__`."""
    import dataclasses

    placement = {k: getattr(args, k) for k in ("output_dir", "use_cpu", "bf16", "fp16") if hasattr(args, k)}
    try:
        reference = trl_cls(**placement)
    except Exception:  # a default that cannot be built here: fall back to the declared defaults only
        return {}
    return {f.name: getattr(reference, f.name) for f in dataclasses.fields(trl_cls) if f.init}


class TunablePartsMixin:
    """Tunable parts, per-part LR groups and the did-it-train check, for `PivotSFTTrainer` and `PivotDPOTrainer`."""

    def _setup_tunable_parts(self, model, args, after_tunable_parts=None, train_dataset=None, peft_config=None):
        """Before the parent's `__init__`: `requires_grad` from `tunable_parts`, and with a `peft_config` the config
        the parent wraps the model with (every tunable part without adapters trained in full). Returns that config.
        `_finish_tunable_parts` completes the setup once the parent has wrapped the model."""
        if isinstance(model, str):
            raise TypeError("Pivot trainers take an instantiated model; build it with pivot_hf.trainer.load_model.")
        check_part_lrs(args)
        check_vision_data_needs_vlm(model, train_dataset)
        # Rows without images (TRL's rule: no `image`/`images` key in the first row) never reach the vision tower: it
        # gets no gradient and stays as it is, as in TRL. Known now, so the end-of-run check does not fail on it.
        self._vision_tower_gets_no_gradient = (
            "vision_tower" in args.tunable_parts and dataset_has_images(train_dataset) is False
        )
        if self._vision_tower_gets_no_gradient and int(os.environ.get("RANK", "0")) == 0:
            logger.warning(
                "The training rows have no images (no `image`/`images` column): the vision tower gets no gradient and "
                "stays unchanged, although tunable_parts=%s lists it. Train on image rows to train the tower.",
                args.tunable_parts,
            )
        from accelerate.utils import is_peft_model

        if is_peft_model(model):
            # Wrapped by the caller (e.g. an adapter to continue): its own `requires_grad` flags are what trains.
            if peft_config is not None:
                raise RecipeConfigError("Pass either a PeftModel or a `peft_config`, not both.")
        else:
            apply_tunable_parts(model, args.tunable_parts)
        if after_tunable_parts is not None:
            # e.g. Stage 3's projector reuse, whose freeze must win over `tunable_parts`
            after_tunable_parts(model)
        if not any(p.requires_grad for p in model.parameters()):
            raise RecipeConfigError(
                f"tunable_parts={args.tunable_parts} leaves no trainable weight in the model. Fix: add a part that has "
                f"weights (one of {list(TUNABLE_PARTS)})."
            )
        self._peft_parts = None
        if peft_config is not None:
            from .adapters import complete_lora_config

            peft_config, adapted, full = complete_lora_config(model, peft_config, args.tunable_parts)
            self._peft_parts = (adapted, full)
            self._requires_grad_before_peft = {n: p.requires_grad for n, p in model.named_parameters()}
            self._dtypes_before_peft = {n: p.dtype for n, p in model.named_parameters()}
        half = {p.dtype for p in model.parameters() if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16)}
        plugin = getattr(args, "deepspeed_plugin", None)
        if half and plugin is None and int(os.environ.get("RANK", "0")) == 0:
            # Without DeepSpeed's fp32 master weights, AdamW steps of ~lr (1e-6 in Stage 2) are below the resolution
            # of bf16 weights (~1e-4 at magnitude 0.02) and vanish: the run "trains" while the weights never move.
            logger.warning(
                "Trainable weights are stored in %s without DeepSpeed: small updates (lr %g) can round away. Load in "
                "float32 (`dtype: float32`) and keep `bf16: true` for autocast, or use a ZeRO config.",
                sorted(str(d) for d in half),
                args.learning_rate,
            )
        if args.use_liger_kernel:
            _apply_liger_to_language_model(model)
        self._deepspeed_optimizer_check(args)
        return peft_config

    def _finish_tunable_parts(self):
        """After the parent's `__init__` (PEFT wrapping done): re-freeze under PEFT what was frozen before it, then
        log the trainable split of the model that will actually train."""
        from accelerate.utils import is_peft_model

        model = self.model
        if is_peft_model(model) and getattr(self, "_requires_grad_before_peft", None) is not None:
            from .adapters import restore_frozen, restore_full_part_dtypes

            restore_frozen(model, self._requires_grad_before_peft)
            restore_full_part_dtypes(model, self._dtypes_before_peft)
            self._requires_grad_before_peft = self._dtypes_before_peft = None
            adapted, full = self._peft_parts
            if int(os.environ.get("RANK", "0")) == 0:
                config = model.peft_config[model.active_adapter]
                logger.info(
                    "PEFT: %s adapters (r=%s, alpha=%s%s%s) on %s; trained in full beside them: %s.",
                    getattr(config.peft_type, "value", config.peft_type),
                    config.r,
                    config.lora_alpha,
                    ", DoRA" if config.use_dora else "",
                    ", rsLoRA" if config.use_rslora else "",
                    adapted,
                    full or "nothing",
                )
        self._log_split(trainable_split(model), self.args)

    @staticmethod
    def _log_split(split, args):
        lrs = part_learning_rates(args)
        lines = ["Trainable parameters per part (after wrapping):"]
        for part, counts in split.items():
            frac = counts["trainable"] / counts["total"] if counts["total"] else 0.0
            lr = f"lr {lrs[part]:g}" if part in args.tunable_parts else "frozen"
            lines.append(
                f"  {part:<15} {counts['trainable'] / 1e6:10.3f}M / {counts['total'] / 1e6:10.3f}M ({frac:6.1%}) {lr}"
            )
        if int(os.environ.get("RANK", "0")) == 0:
            logger.info("\n".join(lines))

    @staticmethod
    def _deepspeed_optimizer_check(args):
        check_distributed_config(args)

    def create_optimizer(self, model=None):
        """One parameter group per (part, weight decay) with the part's LR; the rest is HF's default optimizer."""
        opt_model = self.model if model is None else model
        if self.optimizer is not None:
            return self.optimizer
        lrs = part_learning_rates(self.args)
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[str, bool], dict] = {}
        for name, param in opt_model.named_parameters():
            if not param.requires_grad:
                continue
            part = part_of(name) or "language_model"
            with_decay = name in decay and self.args.weight_decay > 0
            group = groups.setdefault(
                (part, with_decay),
                {
                    "params": [],
                    "lr": lrs[part],
                    "initial_lr": lrs[part],
                    "weight_decay": self.args.weight_decay if with_decay else 0.0,
                    "name": f"{part}{'' if with_decay else '_no_decay'}",
                },
            )
            group["params"].append(param)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        # The language model's group first: the Trainer logs the LR of group 0 as `learning_rate`.
        order = {part: i for i, part in enumerate(("language_model", "projector", "vision_tower"))}
        param_groups = [groups[key] for key in sorted(groups, key=lambda k: (order[k[0]], not k[1]))]
        for group in param_groups:
            group.pop("initial_lr")  # set by the LR scheduler itself
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    # ------------------------------------------------------------------------------------------- did-it-train check
    def _tunable_named_params(self):
        model = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def train(self, *args, **kwargs):
        check = self.args.check_tunable_parts_changed
        before = checksums(self._tunable_named_params()) if check else None
        output = super().train(*args, **kwargs)
        if check:
            try:
                self.tunable_parts_report = self._check_changed(before, checksums(self._tunable_named_params()))
            except Exception:
                # Nothing computed is lost: the trained model (and processor) is saved before the run fails.
                self.save_model(self.args.output_dir)
                if self.is_world_process_zero():
                    logger.error("End-of-run check failed; the trained model was saved to %s.", self.args.output_dir)
                raise
        return output

    def _check_changed(self, before, after) -> dict[str, dict]:
        report = {}
        for name, stats in before.items():
            part = part_of(name) or "language_model"
            entry = report.setdefault(part, {"changed": 0, "total": 0, "unchanged": []})
            entry["total"] += 1
            # A tolerance instead of equality: before training a tensor may be whole and after it sharded (FSDP2), and
            # a sum over shards rounds differently in the last float64 bits. Real updates move it by far more.
            if name in after and not torch.allclose(stats, after[name], rtol=1e-12, atol=0.0):
                entry["changed"] += 1
            else:
                entry["unchanged"].append(name)
        lines = ["Tunable parts after training (tensors changed / trainable tensors):"]
        for part, entry in report.items():
            lines.append(f"  {part:<15} {entry['changed']}/{entry['total']}")
        if self.is_world_process_zero():
            logger.info("\n".join(lines))
        trained_steps = self.state.global_step
        vision = report.get("vision_tower")
        no_images = getattr(self, "_vision_tower_gets_no_gradient", False)
        if (
            "vision_tower" in self.args.tunable_parts
            and not no_images
            and trained_steps > 0
            and (vision is None or vision["changed"] == 0)
        ):
            raise RuntimeError(
                f"The vision tower was meant to train (tunable_parts={self.args.tunable_parts}) but none of its "
                f"weights changed in {trained_steps} steps. Check vision_tower_lr (is it 0?), that gradients reach "
                "the tower (vision_feature_layer, frozen parameters), and the mixed-precision setup (weights stored "
                "in bf16 can round small updates away). Disable the check with `check_tunable_parts_changed: false`."
            )
        for part, entry in report.items():
            if part == "vision_tower" and no_images:
                continue  # said at construction
            if trained_steps > 0 and entry["changed"] == 0:
                logger.warning("Tunable part %s did not change in %d steps.", part, trained_steps)
            elif entry["unchanged"]:
                logger.warning(
                    "%s: %d trainable tensors unchanged, e.g. %s",
                    part,
                    len(entry["unchanged"]),
                    entry["unchanged"][:3],
                )
        return report


def _apply_liger_to_language_model(model) -> None:
    """Liger's layer kernels (RMSNorm, RoPE, SwiGLU) on the LLM backbone, which transformers' own Liger hook skips
    (it does not know the `pivot` model type). The fused linear cross-entropy stays off: TRL patches the LM head."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError as err:
        raise RecipeConfigError(
            "`use_liger_kernel: true` but liger-kernel is not installed. Fix: `pip install -e .[liger]`, or set "
            "`use_liger_kernel: false`."
        ) from err
    _apply_liger_kernel_to_instance(
        model=model.model.language_model, fused_linear_cross_entropy=False, cross_entropy=False
    )
    logger.info("Liger kernels applied to the language model (%s).", model.config.text_config.model_type)


__all__ = [
    "TunablePartsMixin",
    "apply_tunable_parts",
    "check_distributed_config",
    "check_part_lrs",
    "checksums",
    "part_of",
    "trainable_split",
]
