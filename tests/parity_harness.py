"""Run one configuration through a TRL trainer and through its Pivot subclass, and compare what each did.

Both sides get the same tiny model (a fresh load of the same checkpoint), the same rows and the same seed. The
outcome of a side is either a refusal (the exception and where it happened: construction, training or evaluation) or
the metrics it logged (step 1 by default). `assert_same` is the parity rule: the same refusal (same exception type,
ours may be a subclass; both messages match the case's pattern), or both accepted with every metric TRL logs equal
to 1e-6 relative.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from datasets import Dataset, IterableDataset
from PIL import Image


REL = 1e-6
# Set by the Trainer from wall time, not by the computation.
TIMING_KEYS = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "step_time"}
TIMING_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second", "_time")


@dataclass
class Case:
    """One row of the parity table."""

    id: str
    kind: str = "dpo"  # dpo | sft | grpo
    config: dict = field(default_factory=dict)
    data: str = "image"  # see `make_rows`
    tower: str = "siglip"
    attn: str = "sdpa"
    model: str = "pivot"  # pivot | text_llm (a tiny Qwen2 causal LM with its tokenizer)
    ref: str = "explicit"  # explicit (a perturbed copy) | none | same (the policy object itself)
    iterable: bool = False
    eval: str | None = None  # steps | evaluate_raw | evaluate_raw_after | predict | compute_metrics
    resume: bool = False
    steps: int = 1
    refused: str | None = None  # pattern both refusals must match (None: both must accept)
    # Where ours deliberately goes beyond TRL (vision precompute): TRL runs with these overrides and refuses the
    # original; ours must accept and give TRL's numbers.
    parent_overrides: dict | None = None
    pivot_config: dict = field(default_factory=dict)  # fields only the Pivot configs have
    plain_config: bool = False  # ours gets TRL's own config class too (DPOConfig, not PivotDPOConfig)
    positional: bool = False  # train_dataset and processing_class passed positionally, in TRL's order


@dataclass
class Outcome:
    error: BaseException | None = None
    stage: str | None = None
    logs: list[dict] = field(default_factory=list)
    eval_metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    trainer: Any = None

    @property
    def accepted(self) -> bool:
        return self.error is None

    def step_metrics(self, step: int = 1) -> dict:
        for log in self.logs:
            if log.get("step") == step and "loss" in log:
                return log
        raise AssertionError(f"no training log at step {step}: {self.logs}")


# --------------------------------------------------------------------------------------------------------- data
def _image(rng, size=32, wide=False):
    shape = (size, size * 2 if wide else size, 3)
    return Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8))


def _user(text, images=0):
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}]


def _assistant(text):
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


PAIRS = [
    ("What is shown?", "A red cat sits.", "Two blue dogs are running fast."),
    ("Colour?", "Green", "Maybe yellow"),
]


def make_rows(data: str, seed: int = 0) -> list[dict]:
    """`image` / `multi_image` / `wide_image` / `text` preference rows, `sft_image` / `sft_messages` / `sft_text`
    SFT rows, `grpo_image` / `grpo_text` prompts. Two rows each (one batch of two)."""
    rng = np.random.default_rng(seed)
    rows = []
    for question, chosen, rejected in PAIRS:
        if data in ("image", "multi_image", "wide_image"):
            count = 2 if data == "multi_image" else 1
            images = [_image(rng, wide=data == "wide_image") for _ in range(count)]
            rows.append(
                {
                    "images": images,
                    "prompt": _user(question, count),
                    "chosen": _assistant(chosen),
                    "rejected": _assistant(rejected),
                }
            )
        elif data == "text":
            rows.append(
                {
                    "prompt": [{"role": "user", "content": question}],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            )
        elif data == "sft_image":
            rows.append({"images": [_image(rng)], "prompt": _user(question, 1), "completion": _assistant(chosen)})
        elif data == "sft_messages":
            rows.append({"images": [_image(rng)], "messages": _user(question, 1) + _assistant(chosen)})
        elif data == "sft_text":
            rows.append(
                {
                    "prompt": [{"role": "user", "content": question}],
                    "completion": [{"role": "assistant", "content": chosen}],
                }
            )
        elif data == "grpo_image":
            rows.append({"images": [_image(rng)], "prompt": _user(question, 1), "solution": chosen})
        elif data == "grpo_text":
            rows.append({"prompt": [{"role": "user", "content": question}], "solution": chosen})
        else:
            raise ValueError(data)
    return rows


def make_dataset(data: str, iterable: bool = False, seed: int = 0):
    rows = make_rows(data, seed)
    if iterable:
        return IterableDataset.from_generator(lambda: iter(make_rows(data, seed)))
    return Dataset.from_list(rows)


# ------------------------------------------------------------------------------------------------------- models
class Models:
    """Checkpoints of the module (built once per session by the conftest factory) and fresh loads of them."""

    def __init__(self, tiny_pivot_factory, tmp_path_factory):
        self._factory = tiny_pivot_factory
        self._tmp = tmp_path_factory
        self._processors = {}
        self._text_llm = None

    def path(self, tower: str) -> str:
        return self._factory(tower, "qwen2")

    def processor(self, case: Case):
        if case.model == "text_llm":
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(self.text_llm_path())
        from pivot_hf import PivotProcessor

        if case.tower not in self._processors:
            self._processors[case.tower] = PivotProcessor.from_pretrained(self.path(case.tower))
        return self._processors[case.tower]

    def text_llm_path(self) -> str:
        if self._text_llm is None:
            from pivot_hf.testing import build_tiny_llm

            self._text_llm = build_tiny_llm(self._tmp.mktemp("text-llm") / "qwen2")
        return self._text_llm

    def policy(self, case: Case):
        if case.model == "text_llm":
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(self.text_llm_path(), dtype=torch.float32)
        from pivot_hf import PivotForConditionalGeneration

        return PivotForConditionalGeneration.from_pretrained(
            self.path(case.tower), dtype=torch.float32, attn_implementation=case.attn
        )

    def reference(self, case: Case):
        """The policy's checkpoint moved by a fixed perturbation, so that step-1 rewards and losses are not trivial."""
        model = self.policy(case)
        generator = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
        return model.requires_grad_(False).eval()


# ----------------------------------------------------------------------------------------------------- configs
def _common(output_dir: str, case: Case) -> dict:
    kwargs = {
        "output_dir": output_dir,
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 2,
        "max_steps": case.steps,
        # Plain SGD: the step is the gradient itself (Adam would blow round-off up into full-size steps).
        "optim": "sgd",
        "learning_rate": 0.5,
        "use_cpu": True,
        "bf16": False,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
    }
    if case.kind == "grpo":
        kwargs.update(
            num_generations=2,
            max_completion_length=6,
            generation_batch_size=2,
            per_device_train_batch_size=2,
            temperature=1.0,
            beta=0.0,
        )
    if case.kind == "sft":
        kwargs.update(max_length=None)
    return kwargs


def config_for(case: Case, parent: bool, output_dir: str, overrides: dict | None = None):
    from trl import DPOConfig, GRPOConfig, SFTConfig

    from pivot_hf.configs import PivotDPOConfig, PivotSFTConfig
    from pivot_hf.trainer.grpo import PivotGRPOConfig

    classes = {
        "dpo": (DPOConfig, PivotDPOConfig),
        "sft": (SFTConfig, PivotSFTConfig),
        "grpo": (GRPOConfig, PivotGRPOConfig),
    }
    cls = classes[case.kind][0 if parent or case.plain_config else 1]
    kwargs = {**_common(output_dir, case), **case.config, **({} if parent else case.pivot_config), **(overrides or {})}
    return cls(**kwargs)


def length_reward(completions, **kwargs):
    """A reward that differs between completions (so GRPO advantages are not all zero)."""
    return [float(len(str(c))) / 10.0 for c in completions]


# ------------------------------------------------------------------------------------------------------ running
def _trainer_class(kind: str, parent: bool):
    from trl import DPOTrainer, GRPOTrainer, SFTTrainer

    from pivot_hf.trainer import PivotDPOTrainer, PivotSFTTrainer
    from pivot_hf.trainer.grpo import PivotGRPOTrainer

    return {
        "dpo": (DPOTrainer, PivotDPOTrainer),
        "sft": (SFTTrainer, PivotSFTTrainer),
        "grpo": (GRPOTrainer, PivotGRPOTrainer),
    }[kind][0 if parent else 1]


def logits_metrics(prediction) -> dict:
    """`compute_metrics` of the eval cases: the logits it receives, at real and at padding positions."""
    logits = prediction.predictions
    logits = logits[0] if isinstance(logits, tuple) else logits
    ids = prediction.label_ids
    logits = np.asarray(logits, dtype=np.float64)
    return {
        "logits_sum": float(logits.sum()),
        "logits_abs_sum": float(np.abs(logits).sum()),
        "logits_shape0": float(logits.shape[0]),
        "ids_sum": float(np.asarray(ids).sum()),
    }


def build(case: Case, parent: bool, models: Models, output_dir: str, overrides: dict | None = None, **extra):
    """Construct the trainer of one side (exceptions propagate)."""
    cls = _trainer_class(case.kind, parent)
    args = config_for(case, parent, output_dir, overrides)
    model = models.policy(case)
    train = make_dataset(case.data, case.iterable)
    kwargs: dict[str, Any] = {"args": args, "train_dataset": train, "processing_class": models.processor(case)}
    if case.eval in ("steps", "compute_metrics"):
        kwargs["eval_dataset"] = make_dataset(case.data, seed=1)
    if case.eval == "compute_metrics":
        kwargs["compute_metrics"] = logits_metrics
    kwargs.update(extra)
    if case.positional:
        # TRL's order: DPO (model, ref_model, args, data_collator, train_dataset, eval_dataset, processing_class),
        # SFT (model, args, data_collator, train_dataset, eval_dataset, processing_class),
        # GRPO (model, reward_funcs, args, train_dataset, eval_dataset, processing_class).
        order = ["args", "train_dataset", "eval_dataset", "processing_class"]
        if case.kind != "grpo":
            order.insert(1, "data_collator")
        kwargs.setdefault("eval_dataset", None)
        if case.kind != "grpo":
            kwargs.setdefault("data_collator", None)
        positional = [kwargs.pop(name) for name in order]
        if case.kind == "dpo":
            ref = {"explicit": lambda: models.reference(case), "none": lambda: None}[case.ref]()
            return cls(model, ref, *positional, **kwargs)
        if case.kind == "grpo":
            return cls(model, [length_reward], *positional, **kwargs)
        return cls(model, *positional, **kwargs)
    if case.kind == "dpo":
        ref = {"explicit": lambda: models.reference(case), "none": lambda: None, "same": lambda: model}[case.ref]()
        return cls(model, ref, **kwargs)
    if case.kind == "grpo":
        return cls(model, [length_reward], **kwargs)
    return cls(model, **kwargs)


def run(case: Case, parent: bool, models: Models, tmp_path, overrides: dict | None = None) -> Outcome:
    out = Outcome()
    output_dir = str(tmp_path / ("trl" if parent else "pivot"))
    out.stage = "init"
    try:
        trainer = build(case, parent, models, output_dir, overrides)
        out.trainer = trainer
        if case.eval == "evaluate_raw":
            out.stage = "eval"
            out.eval_metrics = trainer.evaluate(eval_dataset=make_dataset(case.data, seed=1))
        if case.eval == "predict":
            out.stage = "eval"
            prediction = trainer.predict(make_dataset(case.data, seed=1))
            out.eval_metrics = dict(prediction.metrics)
        out.stage = "train"
        if case.resume:
            # Train and checkpoint the first step, then resume from that checkpoint with a fresh trainer.
            trainer.args.save_strategy = "steps"
            trainer.args.save_steps = 1
            trainer.train()
            final = case.steps + 1
            trainer = build(case, parent, models, output_dir, {**(overrides or {}), "max_steps": final})
            out.trainer = trainer
            trainer.train(resume_from_checkpoint=True)
        else:
            trainer.train()
        out.logs = [dict(log) for log in trainer.state.log_history]
        if case.eval == "evaluate_raw_after":
            out.stage = "eval"
            out.eval_metrics = trainer.evaluate(eval_dataset=make_dataset(case.data, seed=1))
        out.stage = None
    except Exception as err:  # the refusal is the outcome
        out.error = err
    return out


def _numeric(logs: dict) -> dict:
    return {
        k: float(v)
        for k, v in logs.items()
        if isinstance(v, (int, float)) and k not in TIMING_KEYS and not k.endswith(TIMING_SUFFIXES)
    }


def _tolerance(key: str, metrics: dict, beta: float) -> float:
    """Absolute tolerance of a metric beyond `REL * |value|`.

    DPO rewards are `beta * (logp - ref_logp)`: a difference of two sums of ~-70, so a 1e-6 relative agreement of
    the log-probs (what the computation can promise: the shared-prefix forward rounds differently from the plain one)
    is `1e-6 * beta * |logp|` on a reward, whatever the reward's own size.
    """
    if "logits/" in key:
        # The mean logit over completion tokens and the whole vocabulary sums values of both signs to nearly 0
        # (|mean| ~ 1e-6 on the tiny models), so its relative error is no measure; 1e-9 absolute is still three
        # orders below the logits' own rounding (packed and plain forwards sum in different orders).
        return 1e-9
    if key == "grad_norm":
        # The norm of a gradient that went through the whole backward pass: the pair forward (shared prefix, pairs
        # packed into one row, attention per pair) sums in other orders than the plain one, which the project bounds
        # at 1e-5 relative per gradient tensor (tests/test_fast_dpo.py); seen here: up to 2.5e-6.
        return 1e-5 * abs(metrics[key])
    if key in ("loss", "eval_loss", "test_loss") and any("logps/" in k for k in metrics):
        # A DPO loss is a function of the reward margin with slope at most 1 (|d softplus(-m)/dm| < 1): it gets the
        # margin's bound, `REL * beta * |logp|` (at beta 0.5: seen 1.4e-6 relative on a loss of 0.74).
        prefix = key[: -len("loss")]
        scale = max((abs(v) for k, v in metrics.items() if k.startswith(prefix + "logps/")), default=0.0)
        return REL * beta * scale
    if "rewards/" not in key:
        return 1e-12
    prefix = key[: key.index("rewards/")]
    scale = max((abs(v) for k, v in metrics.items() if k.startswith(prefix + "logps/")), default=0.0)
    return REL * beta * scale


def assert_metrics_equal(theirs: dict, ours: dict, what: str, beta: float = 0.1) -> int:
    theirs, ours = _numeric(theirs), _numeric(ours)
    missing = sorted(set(theirs) - set(ours))
    assert not missing, f"{what}: ours does not log {missing}"
    bad = {
        k: (theirs[k], ours[k])
        for k in theirs
        if not math.isclose(theirs[k], ours[k], rel_tol=REL, abs_tol=_tolerance(k, theirs, beta))
        and not (math.isnan(theirs[k]) and math.isnan(ours[k]))
    }
    assert not bad, f"{what}: metrics differ (TRL, Pivot): {bad}"
    return len(theirs)


def assert_same(case: Case, theirs: Outcome, ours: Outcome) -> None:
    if case.refused is not None and case.parent_overrides is None:
        assert not theirs.accepted, f"{case.id}: TRL accepted a configuration the table says it refuses"
        assert not ours.accepted, f"{case.id}: TRL refuses ({theirs.error!r}) but Pivot accepted"
        assert theirs.stage == ours.stage, f"{case.id}: refused at {theirs.stage} by TRL, at {ours.stage} by Pivot"
        assert isinstance(ours.error, type(theirs.error)), (
            f"{case.id}: TRL raises {type(theirs.error).__name__}, Pivot {type(ours.error).__name__}: {ours.error}"
        )
        for side, err in (("TRL", theirs.error), ("Pivot", ours.error)):
            assert re.search(case.refused, str(err), re.S), f"{case.id}: {side}'s refusal says {err!r}"
        return
    if theirs.error is not None:
        raise AssertionError(f"{case.id}: TRL refused ({theirs.stage})") from theirs.error
    if ours.error is not None:
        raise AssertionError(f"{case.id}: TRL accepts, Pivot refused ({ours.stage})") from ours.error
    step = case.steps + 1 if case.resume else 1
    beta = case.config.get("beta", 0.1)
    assert_metrics_equal(theirs.step_metrics(step), ours.step_metrics(step), f"{case.id} step {step}", beta)
    if case.eval in ("steps", "compute_metrics"):
        their_eval = [log for log in theirs.logs if "eval_loss" in log]
        our_eval = [log for log in ours.logs if "eval_loss" in log]
        assert their_eval and len(their_eval) == len(our_eval), f"{case.id}: eval logs {their_eval} vs {our_eval}"
        for a, b in zip(their_eval, our_eval):
            assert_metrics_equal(a, b, f"{case.id} eval", beta)
    if case.eval in ("evaluate_raw", "evaluate_raw_after", "predict"):
        assert theirs.eval_metrics, f"{case.id}: no eval metrics"
        assert_metrics_equal(theirs.eval_metrics, ours.eval_metrics, f"{case.id} {case.eval}", beta)
