"""What a run shows while and after it trains: per-part update norms and LRs in the logs, `training_curves.png`.

`TrainingMonitorMixin` sits ahead of the TRL trainer in the Pivot trainers (`PivotSFTTrainer`, `PivotDPOTrainer`,
`PivotGRPOTrainer`). It adds two callbacks and merges their metrics into every training log, so they reach
`trainer.state.log_history`, `trainer_state.json` and every `report_to` integration (trackio, tensorboard, ...):

- `update_norm/<part>`: the relative update of each part (vision tower, projector, LLM) on the logged optimizer
  step, ``||theta_after - theta_before||_2 / ||theta_before||_2`` over the part's trainable tensors (the usual
  update-to-weight ratio, e.g. Karpathy's "update/data ratio"; ~1e-3 is a healthy order of magnitude for Adam).
  A part with no trainable tensor logs exactly 0 when its weights are bit-identical across the step, NaN (and a
  warning) when something outside the optimizer changed them. Cost: on logged steps only, one transient copy of the
  trainable weights (of the local shard under ZeRO-3/FSDP), taken after the backward pass so it does not add to the
  activation peak (under DeepSpeed, which steps inside the backward, before the forward), turned into the update in
  place (half-precision weights in fp32, 64 MiB at a time), and multi-tensor norm kernels over 64k-element
  pieces; no extra forward. The copy has a memory budget, `update_norm_memory_mib` (512 MiB by default): past it,
  every k-th 64k-element piece is copied instead (k = copy size / budget, the first piece rotating with the step)
  and the ratio is estimated on those pieces. Sampling, because the alternatives do not bound the peak: the
  optimizer updates all tensors in one multi-tensor call, so the values before the step cannot be streamed tensor
  by tensor, and a separate logging interval only makes the full copy rarer.
- `lr/<part>`: the learning rate each part's parameter group used on that step (the Trainer logs group 0 only).

At the end of `train()`, rank 0 draws `training_curves.png` into `output_dir` from `state.log_history` (matplotlib's
Agg canvas, no display needed): loss, DPO reward accuracy and margins (SFT token accuracy, GRPO reward), per-part LR
and per-part update norm against the optimizer step.

Under DDP every rank computes the same numbers from its identical replica. Under ZeRO-3 and FSDP each rank sums over
its shard and the sums are all-reduced, so every rank again logs the same values; a sharding that hides the part of
a tensor (flattened FSDP1 parameters without `use_orig_params`) is skipped with a one-time message.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os

import torch
from transformers import TrainerCallback, TrainingArguments
from transformers.integrations import is_trackio_available
from transformers.trainer_utils import IntervalStrategy

from ..configs import TUNABLE_PARTS
from .tunable import _local, part_of


logger = logging.getLogger(__name__)

CURVES_FILENAME = "training_curves.png"


_CHUNK = 1 << 24  # elements per float64 chunk: bounds the temporary memory of a reduction to 128 MiB


def _chunks(tensor: torch.Tensor):
    """Float64 pieces of a tensor's values, so a large embedding is never copied whole in float64."""
    flat = tensor.detach().reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        yield flat[start : start + _CHUNK].double()


DEFAULT_MEMORY_MIB = 512  # the default of `update_norm_memory_mib`
_PIECE = 1 << 16  # elements per norm, so that one multi-tensor call spreads over many blocks/threads
_GROUP = 256  # pieces per multi-tensor call: half-precision pieces are widened one group (64 MiB of fp32) at a time


def _wide(piece: torch.Tensor) -> torch.Tensor:
    # The difference of two bf16/fp16 weights is often not representable in their dtype (a weight that changes sign
    # or doubles); in fp32 it is exact or within 2^-24. fp32/fp64 pieces are returned as they are (no copy).
    return piece if piece.dtype in (torch.float32, torch.float64) else piece.float()


def _sum_of_squares(pieces: list[torch.Tensor]) -> torch.Tensor:
    """Sum of the squared values of `pieces` (tensors of at most `_PIECE` elements, any float dtype), a float64 scalar.

    fp32 norms per piece, combined in float64: relative error ~1e-6 (the CPU kernel's fp32 accumulation over 64k
    values; ~1e-3 over one whole embedding), plenty for a logged ratio. Accumulating in float64 inside the kernel is
    exact but takes about twice as long on CPU, paid on every logged step."""
    return torch.stack(torch._foreach_norm(pieces, 2, dtype=torch.float32)).double().square().sum()


def _update_and_weight(now: list[torch.Tensor], then: list[torch.Tensor]) -> torch.Tensor:
    """`(||now - then||^2, ||then||^2)` over paired flat tensors, float64 `(2,)` on their device. `then` (the snapshot)
    may be overwritten: fp32 pieces are turned into the update in place, so no copy of the model is made."""
    pieces_now = [piece for tensor in now for piece in tensor.split(_PIECE)]
    pieces_then = [piece for tensor in then for piece in tensor.split(_PIECE)]
    total = torch.zeros(2, dtype=torch.float64, device=now[0].device)
    for start in range(0, len(pieces_now), _GROUP):
        after = [_wide(piece) for piece in pieces_now[start : start + _GROUP]]
        before = [_wide(piece) for piece in pieces_then[start : start + _GROUP]]
        weight = _sum_of_squares(before)
        torch._foreach_sub_(before, after)
        total += torch.stack([_sum_of_squares(before), weight])
    return total


def _live_piece(tensor: torch.Tensor, index: int) -> torch.Tensor:
    """Piece `index` (`_PIECE` elements) of a tensor's flattened values, read now."""
    return tensor.detach().reshape(-1)[index * _PIECE : (index + 1) * _PIECE]


@contextlib.contextmanager
def _one_cpu_thread():
    """Run the monitor's CPU copies and norms on one intra-op thread, the caller's thread count restored after.

    They are memory-bound (one core already streams the bytes), and on a machine whose cores are shared with other
    jobs every multi-threaded kernel waits at its barrier for a preempted thread: measured on a 2-core VM at load
    average ~11, the snapshot + norms of 22M fp32 weights took 0.4-10 s per logged step on 2 threads and 0.1 s on one.
    """
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


def _group_part(group: dict, names_by_id: dict[int, str]) -> str | None:
    """The part of an optimizer parameter group: its `name` (set by `TunablePartsMixin.create_optimizer`), else the
    part of its first named parameter (a custom optimizer)."""
    name = group.get("name")
    if isinstance(name, str):
        part = name.removesuffix("_no_decay")
        if part in TUNABLE_PARTS:
            return part
    for param in group.get("params", []):
        if id(param) in names_by_id:
            return part_of(names_by_id[id(param)]) or "language_model"
    return None


class UpdateNormCallback(TrainerCallback):
    """Per-part relative update norm and learning rate of the optimizer step that the Trainer is about to log.

    `metrics` holds the values of the last measured step until `TrainingMonitorMixin.log` takes them (`pop_metrics`).
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self._snapshot: dict | None = None
        self._metrics: dict[str, float] = {}
        self._warned: set[str] = set()

    # -- which steps -------------------------------------------------------------------------------------------------
    @staticmethod
    def _will_log(args: TrainingArguments, state, step: int) -> bool:
        """Whether the Trainer logs after optimizer step `step` (DefaultFlowCallback's rule); every step for epoch
        logging, whose last step is not known in advance."""
        strategy = args.logging_strategy
        if strategy == IntervalStrategy.NO:
            return False
        if strategy == IntervalStrategy.EPOCH:
            return True
        return (step == 1 and args.logging_first_step) or (state.logging_steps and step % state.logging_steps == 0)

    def _model(self):
        trainer = self.trainer
        return trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model

    # -- before the step: snapshot -------------------------------------------------------------------------------------
    def on_step_begin(self, args, state, control, **kwargs):
        # DeepSpeed steps inside `accelerator.backward`, before any optimizer-step event: snapshot before the forward.
        if getattr(self.trainer, "is_deepspeed_enabled", False):
            self._take_snapshot(args, state)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not getattr(self.trainer, "is_deepspeed_enabled", False):
            self._take_snapshot(args, state)

    def _take_snapshot(self, args, state):
        self._snapshot = None
        with torch.no_grad(), _one_cpu_thread():
            self._snapshot = self._build_snapshot(args, state)

    def _build_snapshot(self, args, state) -> dict | None:
        if not self._will_log(args, state, state.global_step + 1):
            return None
        model = self._model()
        trainable, frozen = {}, {part: [] for part in TUNABLE_PARTS}
        unattributed = 0
        # ZeRO-3 partitions and FSDP2 DTensors say so; FSDP1's original parameters are plain views of the local shard.
        sharded = bool(getattr(self.trainer, "is_fsdp_enabled", False))
        for name, param in model.named_parameters():
            part = part_of(name)
            if part is None:
                unattributed += int(param.requires_grad)
                continue
            local, is_shard = _local(param)
            sharded = sharded or is_shard
            if param.requires_grad:
                trainable.setdefault(part, []).append(local)
            else:
                frozen[part].append(local)
        if unattributed and not trainable:
            self._warn_once(
                "flat",
                "Update norms per part are skipped: the trainable parameters carry no part name (flattened FSDP1 "
                "parameters?). Use FSDP2 or `fsdp_use_orig_params: true` to get them.",
            )
            return None
        trainable = self._sampled_copies(trainable, args, state)
        names_by_id = {id(p): n for n, p in model.named_parameters()}
        lrs = {}
        optimizer = self.trainer.optimizer
        for group in getattr(optimizer, "param_groups", []):
            part = _group_part(group, names_by_id)
            if part is not None:
                lrs.setdefault(part, float(group["lr"]))
        return {
            "trainable": trainable,
            "frozen": {part: (tensors, self._checksum(tensors)) for part, tensors in frozen.items()},
            "lrs": lrs,
            "sharded": sharded,
        }

    def _sampled_copies(self, trainable: dict[str, list[torch.Tensor]], args, state) -> dict[str, list[tuple]]:
        """Per part, `(live piece, copy of it)` pairs of flat `_PIECE`-element pieces of the trainable tensors: all
        of them when their copy fits `update_norm_memory_mib`, else every `k`-th piece (`k` = copy size / budget,
        rounded up), starting at piece `global_step % k` so that successive logged steps cover different pieces;
        a part with fewer than `k` pieces keeps one."""
        budget = getattr(args, "update_norm_memory_mib", DEFAULT_MEMORY_MIB)
        size = sum(t.numel() * t.element_size() for tensors in trainable.values() for t in tensors)
        stride = 1 if budget is None or budget < 0 else max(1, math.ceil(size / max(budget * 2**20, 1)))
        if stride > 1:
            self._warn_once(
                "sampled",
                f"Update norms are estimated on 1 in {stride} pieces of {_PIECE} weights (a copy of all trainable "
                f"weights, {size / 2**20:.0f} MiB, exceeds update_norm_memory_mib={budget}).",
            )
        offset = int(state.global_step) % stride
        sampled = {}
        for part, tensors in trainable.items():
            # (tensor, piece index): the live piece is sliced again after the step (`_live_piece`), so that a
            # non-contiguous parameter, whose flat view would be a copy, is read as the optimizer left it.
            pieces = [(t, i) for t in tensors for i in range(math.ceil(t.numel() / _PIECE))]
            kept = pieces[offset::stride]
            if pieces and not kept:
                kept = [pieces[offset % len(pieces)]]
            sampled[part] = [(t, i, _live_piece(t, i).clone()) for t, i in kept]
        return sampled

    @staticmethod
    def _checksum(tensors) -> torch.Tensor:
        """(sum, sum of squares) in float64 over local values: equal before and after <=> unchanged, to rounding."""
        total = torch.zeros(2, dtype=torch.float64, device=tensors[0].device if tensors else "cpu")
        for t in tensors:
            for chunk in _chunks(t):
                total += torch.stack([chunk.sum(), chunk.square().sum()]).to(total.device)
        return total.cpu()

    # -- after the step: measure -------------------------------------------------------------------------------------
    def on_step_end(self, args, state, control, **kwargs):
        snapshot, self._snapshot = self._snapshot, None
        if snapshot is None:
            return
        with torch.no_grad(), _one_cpu_thread():
            self._metrics = self._measure(snapshot)

    def _measure(self, snapshot) -> dict[str, float]:
        parts = list(TUNABLE_PARTS)
        # Per part: squared update norm and squared weight norm of the trainable tensors (one host transfer per part,
        # not one per tensor).
        sums = torch.zeros(len(parts), 2, dtype=torch.float64)
        for i, part in enumerate(parts):
            pairs = [(_live_piece(t, i), then) for t, i, then in snapshot["trainable"].get(part, [])]
            if not pairs:
                continue
            now = [t for t, _ in pairs]
            then = [t for _, t in pairs]
            sums[i] += _update_and_weight(now, then).to(sums.device)
        # ... then the frozen tensors' checksums before and after the step.
        frozen_before = torch.stack([snapshot["frozen"][p][1] for p in parts])
        frozen_after = torch.stack([self._checksum(snapshot["frozen"][p][0]) for p in parts])
        packed = torch.cat([sums, frozen_before, frozen_after], dim=1)
        if snapshot["sharded"] and torch.distributed.is_available() and torch.distributed.is_initialized():
            packed = packed.to(self.trainer.args.device)  # NCCL reduces device tensors
            torch.distributed.all_reduce(packed)  # shards: the global sums; padding is zero
            packed = packed.cpu()
        metrics = {}
        for i, part in enumerate(parts):
            update_sq, weight_sq = packed[i, 0].item(), packed[i, 1].item()
            frozen_changed = not torch.equal(packed[i, 2:4], packed[i, 4:6])
            if part not in snapshot["trainable"]:
                value = 0.0
            elif weight_sq > 0:
                value = math.sqrt(update_sq) / math.sqrt(weight_sq)
            elif update_sq > 0:
                # The measured weights are all zero (a zero-initialised bias or LoRA B sampled alone) but moved: the
                # ratio is undefined, and 0 would read as a frozen part.
                value = float("nan")
                self._warn_once(
                    f"{part}:zero",
                    f"The {part}'s measured weights were all zero before a step that changed them (with "
                    "update_norm_memory_mib, the sampled pieces can be a zero-initialised bias): its update_norm is "
                    "logged as NaN for such steps, not 0 (0 means the part did not move).",
                )
            else:
                value = 0.0
            if frozen_changed:
                value = float("nan")
                self._warn_once(
                    part,
                    f"Frozen weights of the {part} changed during an optimizer step: something other than the "
                    "optimizer writes to them. Its update_norm is logged as NaN.",
                )
            metrics[f"update_norm/{part}"] = value
        for part, lr in snapshot["lrs"].items():
            metrics[f"lr/{part}"] = lr
        return metrics

    def pop_metrics(self) -> dict[str, float]:
        metrics, self._metrics = self._metrics, {}
        return metrics

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            if self.trainer.is_world_process_zero():
                logger.warning(message)


class TrainingCurvesCallback(TrainerCallback):
    """Writes `training_curves.png` into `output_dir` at the end of training (rank 0), from `state.log_history`."""

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and state.log_history:
            try:
                path = plot_training_curves(
                    state.log_history,
                    os.path.join(args.output_dir, CURVES_FILENAME),
                    title=f"{args.run_name or args.output_dir}  (step {state.global_step})",
                )
            except Exception as err:  # a plot must never fail a finished run
                logger.warning("Could not draw %s: %s", CURVES_FILENAME, err)
            else:
                if path:
                    logger.info("Training curves: %s", path)
                else:
                    self._no_training_log(args, state)

    @staticmethod
    def _no_training_log(args, state) -> None:
        """A run shorter than `logging_steps` logs no step: still write the file, saying why it has no curve."""
        reason = (
            f"No training step was logged: the run ended at step {state.global_step} and logs every "
            f"{state.logging_steps} steps (logging_strategy={getattr(args.logging_strategy, 'value', args.logging_strategy)}). Lower `logging_steps` to see "
            "the loss, LR and update-norm curves."
        )
        logger.warning(reason)
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure

            fig = Figure(figsize=(13, 8.5), dpi=110, layout="constrained")
            FigureCanvasAgg(fig)
            fig.suptitle(f"{args.run_name or args.output_dir}  (step {state.global_step})")
            fig.text(0.5, 0.5, reason.replace(": ", ":\n", 1), ha="center", va="center", fontsize=14, wrap=True)
            os.makedirs(args.output_dir, exist_ok=True)
            fig.savefig(os.path.join(args.output_dir, CURVES_FILENAME))
        except Exception as err:  # a plot must never fail a finished run
            logger.warning("Could not draw %s: %s", CURVES_FILENAME, err)


def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(e["step"], e[key]) for e in history if key in e and isinstance(e[key], (int, float))]
    return [s for s, _ in points], [float(v) for _, v in points]


def plot_training_curves(history: list[dict], path: str, title: str | None = None) -> str | None:
    """Draw loss, preference/accuracy metrics, per-part LR and per-part update norm against step into `path` (PNG).

    `history` is `trainer.state.log_history` (or `trainer_state.json["log_history"]`). Returns the path, or None
    when the history holds no training log. Uses matplotlib's Agg canvas directly (no pyplot, no global backend).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [e for e in history if "loss" in e or any(k.startswith("update_norm/") for k in e)]
    if not train:
        return None
    fig = Figure(figsize=(13, 8.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    colors = {"vision_tower": "tab:red", "projector": "tab:green", "language_model": "tab:blue"}

    ax = axes[0, 0]
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        steps, values = _series(history, key)
        if steps:
            ax.plot(steps, values, marker="o", markersize=3, label=label)
    ax.set_title("Loss")
    _finish(ax)

    ax = axes[0, 1]
    if _series(history, "rewards/accuracies")[0]:
        steps, values = _series(history, "rewards/accuracies")
        ax.plot(steps, values, color="tab:purple", marker="o", markersize=3, label="reward accuracy")
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel("reward accuracy")
        twin = ax.twinx()
        steps, values = _series(history, "rewards/margins")
        twin.plot(steps, values, color="tab:orange", marker="s", markersize=3, label="reward margin")
        twin.set_ylabel("reward margin (chosen - rejected)")
        lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="best")
        ax.set_title("DPO: reward accuracy and margin")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    else:
        shown = False
        for key, label in (
            ("mean_token_accuracy", "token accuracy"),
            ("reward", "reward"),
            ("reward_std", "reward std"),
        ):
            steps, values = _series(history, key)
            if steps:
                ax.plot(steps, values, marker="o", markersize=3, label=label)
                shown = True
        ax.set_title("SFT: token accuracy" if _series(history, "mean_token_accuracy")[0] else "Reward")
        if not shown:
            ax.text(0.5, 0.5, "no accuracy or reward logged", ha="center", va="center", transform=ax.transAxes)
        _finish(ax)

    # LRs of different parts differ by orders of magnitude: log scale, with zeros (warmup's first step) left out.
    ax = axes[1, 0]
    for parts, steps, values in _lr_lines(history):
        ax.plot(steps, _positive(values), color=colors[parts[0]], marker="o", markersize=3, label=" = ".join(parts))
    if not ax.lines:
        steps, values = _series(history, "learning_rate")
        ax.plot(steps, _positive(values), marker="o", markersize=3, label="learning_rate")
    if any(v > 0 for line in ax.lines for v in line.get_ydata()):
        ax.set_yscale("log")
    ax.set_title("Learning rate per part")
    _finish(ax)

    ax = axes[1, 1]
    frozen = []
    for part, color in colors.items():
        steps, values = _series(history, f"update_norm/{part}")
        if not steps:
            continue
        if all(v == 0 for v in values):
            frozen.append(part)
            continue
        ax.plot(steps, _positive(values), color=color, marker="o", markersize=3, label=part)
    if any(v > 0 for line in ax.lines for v in line.get_ydata()):
        ax.set_yscale("log")
    if frozen:
        ax.text(0.02, 0.02, "frozen (update 0): " + ", ".join(frozen), transform=ax.transAxes, fontsize=9, va="bottom")
    ax.set_title("Relative update norm ||Δθ|| / ||θ|| per part")
    _finish(ax)

    from matplotlib.ticker import MaxNLocator

    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # optimizer steps
    fig.suptitle(title or os.path.basename(os.path.dirname(os.path.abspath(path))) or "training curves")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    return path


def _lr_lines(history: list[dict]) -> list[tuple[list[str], list[int], list[float]]]:
    """One line per distinct per-part LR schedule, naming every part that follows it: parts sharing an LR (the
    default when no `*_lr` is set) would otherwise draw on top of each other, and only the last one would show."""
    lines: list[tuple[list[str], list[int], list[float]]] = []
    for part in TUNABLE_PARTS:
        steps, values = _series(history, f"lr/{part}")
        if not steps:
            continue
        for parts, other_steps, other_values in lines:
            if other_steps == steps and other_values == values:
                parts.append(part)
                break
        else:
            lines.append(([part], steps, values))
    return lines


def _positive(values: list[float]) -> list[float]:
    return [v if v > 0 else float("nan") for v in values]


def _finish(ax) -> None:
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8, loc="best")


def _drop_missing_trackers(args: TrainingArguments) -> None:
    """A `report_to` tracker that is not installed becomes a clear warning instead of a crash at Trainer init."""
    report_to = args.report_to if isinstance(args.report_to, list) else [args.report_to]
    if "trackio" in report_to and not is_trackio_available():
        args.report_to = [r for r in report_to if r != "trackio"]
        if int(os.environ.get("RANK", "0")) == 0:
            logger.warning(
                "report_to includes 'trackio', which is not installed: this run is not tracked (its metrics are still "
                "in trainer_state.json and %s). Fix: `pip install trackio` (a pivot-hf dependency; reinstall with "
                "`pip install -e .`), or set `report_to: none`.",
                CURVES_FILENAME,
            )


class TrainingMonitorMixin:
    """Adds `UpdateNormCallback` and `TrainingCurvesCallback` to a Trainer and logs the update norms with the loss."""

    def __init__(self, *args, **kwargs):
        for value in (*args, *kwargs.values()):
            if isinstance(value, TrainingArguments):
                _drop_missing_trackers(value)
        super().__init__(*args, **kwargs)
        self.update_norm_callback = UpdateNormCallback(self)
        self.add_callback(self.update_norm_callback)
        self.add_callback(TrainingCurvesCallback())

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # a training log (evaluation logs carry eval_loss)
            logs.update(self.update_norm_callback.pop_metrics())
        super().log(logs, *args, **kwargs)


__all__ = [
    "CURVES_FILENAME",
    "TrainingCurvesCallback",
    "TrainingMonitorMixin",
    "UpdateNormCallback",
    "plot_training_curves",
]
