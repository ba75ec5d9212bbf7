"""The Pivot trainers behave like their TRL parents: same acceptance or refusal, same step-1 numbers.

Every row of `CASES` runs through the TRL trainer and through its Pivot subclass on the same tiny Pivot model (fresh
load of one checkpoint; DPO against a fixed perturbation of it, so rewards and losses are not trivial), the same two
rows and the same seed. Both must refuse with the same exception type and meaning, or both accept and log the same
metrics at step 1 (resume: the first step after resuming) to 1e-6 relative; eval cases compare the eval metrics too.
The cases come from what TRL's own trainer tests exercise (loss types, MPO, WPO, LD-DPO, f-divergences, truncation mode,
gradient accumulation, towers, attention, eval, resume, TR-DPO, precompute, SFT and GRPO on vision-language models).

The tests after the table pin the right value of each behaviour where parity alone is not enough (TR-DPO with a full
mix-in keeps the loss at ln 2, the frozen copy made for `ref_model=None`, evaluation with cached references, ...).
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from parity_harness import Case, Models, assert_metrics_equal, assert_same, build, make_dataset, run


LOSS_TYPES = [
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]  # fmt: skip
LOSS_EXTRA = {"exo_pair": {"label_smoothing": 1e-3}, "robust": {"label_smoothing": 0.1}}

SYNC = {"sync_ref_model": True, "ref_model_mixup_alpha": 1.0, "ref_model_sync_steps": 1}
PRECOMPUTE_REFUSED = r"precompute_ref_log_probs=True` is not supported"

CASES = [
    *[Case(f"dpo-loss-{loss}", config={"loss_type": [loss], **LOSS_EXTRA.get(loss, {})}) for loss in LOSS_TYPES],
    Case("dpo-mpo", config={"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}),
    Case("dpo-wpo", config={"use_weighting": True}),
    Case("dpo-wpo-aot-refused", config={"use_weighting": True, "loss_type": ["aot"]}, refused="WPO-style weighting"),
    Case("dpo-ld-alpha", config={"ld_alpha": 0.5}),
    Case("dpo-cdpo-label-smoothing", config={"label_smoothing": 0.2}),
    Case("dpo-beta", config={"beta": 0.5}),
    *[
        Case(f"dpo-f-{f}", config={"f_divergence_type": f})
        for f in ("forward_kl", "js_divergence", "alpha_divergence")
    ],
    Case(
        "dpo-f-bco-refused",
        config={"f_divergence_type": "js_divergence", "loss_type": ["bco_pair"]},
        refused="only supported for the following loss types",
    ),
    Case("dpo-exo-no-smoothing-refused", config={"loss_type": ["exo_pair"]}, refused="Label smoothing must be"),
    # Rows longer than `max_length` are not compared: TRL truncates them, the Pivot trainers drop and count them as
    # the recipes do (`test_row_contract.py::test_overlong_rows_are_dropped_alike_on_the_recipe_and_trainer_routes`).
    Case(
        "dpo-truncation-keep-end-refused",
        config={"max_length": 512, "truncation_mode": "keep_end"},
        refused="keep_end' is not supported for vision-language models",
    ),
    Case("dpo-grad-accumulation", config={"per_device_train_batch_size": 1, "gradient_accumulation_steps": 2}),
    Case("dpo-multi-image", data="multi_image"),
    Case("dpo-naflex-tower", tower="siglip2_naflex", data="wide_image"),
    Case("dpo-clip-tower", tower="clip"),
    Case("dpo-eager-attention", attn="eager"),
    Case("dpo-no-prefix-sharing", pivot_config={"share_prompt_prefix": False, "share_image_features": False}),
    Case("dpo-eval-steps", config={"eval_strategy": "steps", "eval_steps": 1}, eval="steps"),
    Case("dpo-evaluate-raw-dataset", eval="evaluate_raw"),
    Case("dpo-compute-metrics-logits", config={"eval_strategy": "steps", "eval_steps": 1}, eval="compute_metrics"),
    Case("dpo-resume", resume=True),
    Case("dpo-sync-ref-model", config=SYNC, steps=2),
    Case(
        "dpo-sync-ref-precompute-refused",
        config={**SYNC, "precompute_ref_log_probs": True},
        refused="precompute_ref_log_probs=True",
    ),
    Case("dpo-ref-none", ref="none"),
    Case("dpo-ref-is-model-refused", ref="same", refused="cannot be the same object"),
    Case("dpo-text-rows-on-vlm", data="text"),
    Case("dpo-text-precompute", data="text", config={"precompute_ref_log_probs": True}, ref="none"),
    Case(
        "dpo-text-precompute-iterable-refused",
        data="text",
        iterable=True,
        ref="none",
        config={"precompute_ref_log_probs": True, "max_steps": 1},
        refused="not supported with IterableDataset",
    ),
    Case("dpo-image-iterable", iterable=True),
    Case(
        "dpo-image-precompute-iterable-refused",
        iterable=True,
        config={"precompute_ref_log_probs": True},
        refused=PRECOMPUTE_REFUSED,
    ),
    # Ours goes beyond TRL here: vision precompute works, with TRL's live-reference numbers.
    Case(
        "dpo-image-precompute",
        config={"precompute_ref_log_probs": True},
        refused=PRECOMPUTE_REFUSED,
        parent_overrides={"precompute_ref_log_probs": False},
    ),
    Case(
        "dpo-image-precompute-eval",
        config={"precompute_ref_log_probs": True, "eval_strategy": "steps", "eval_steps": 1},
        eval="steps",
        refused=PRECOMPUTE_REFUSED,
        parent_overrides={"precompute_ref_log_probs": False},
    ),
    Case("dpo-text-llm-text-rows", model="text_llm", data="text"),
    Case("dpo-text-llm-image-rows-refused", model="text_llm", refused="vision-related"),
    # Ours handed TRL's own config class (what TRL's docs and examples pass), and TRL's positional order.
    Case("dpo-plain-trl-config", plain_config=True, ref="none"),
    Case("dpo-plain-trl-config-positional", plain_config=True, positional=True, ref="none"),
    # SFT
    Case("sft-vlm-prompt-completion", kind="sft", data="sft_image"),
    Case("sft-vlm-messages", kind="sft", data="sft_messages"),
    Case("sft-vlm-naflex", kind="sft", data="sft_image", tower="siglip2_naflex"),
    Case(
        "sft-vlm-grad-accumulation",
        kind="sft",
        data="sft_image",
        config={"per_device_train_batch_size": 1, "gradient_accumulation_steps": 2},
    ),
    Case(
        "sft-vlm-eval-steps",
        kind="sft",
        data="sft_image",
        config={"eval_strategy": "steps", "eval_steps": 1},
        eval="steps",
    ),
    Case("sft-text-rows-on-vlm", kind="sft", data="sft_text"),
    Case(
        "sft-vlm-packing-refused",
        kind="sft",
        data="sft_image",
        config={"packing": True},
        refused="[Pp]acking is not supported for vision",
    ),
    Case("sft-text-llm-image-rows-refused", kind="sft", model="text_llm", data="sft_image", refused="vision-related"),
    # GRPO
    Case("grpo-vlm-images", kind="grpo", data="grpo_image"),
    Case("grpo-vlm-kl-reference", kind="grpo", data="grpo_image", config={"beta": 0.1}),
    Case("grpo-text-rows-on-vlm", kind="grpo", data="grpo_text"),
    Case("sft-plain-trl-config", kind="sft", data="sft_image", plain_config=True),
    Case("sft-plain-trl-config-positional", kind="sft", data="sft_image", plain_config=True, positional=True),
    Case("grpo-plain-trl-config", kind="grpo", data="grpo_image", plain_config=True),
    Case("grpo-plain-trl-config-positional", kind="grpo", data="grpo_image", plain_config=True, positional=True),
]


@pytest.fixture(scope="module")
def models(tiny_pivot_factory, tmp_path_factory):
    return Models(tiny_pivot_factory, tmp_path_factory)


def test_table_is_large_and_covers_all_trainers():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    assert {c.kind for c in CASES} == {"dpo", "sft", "grpo"}
    from trl import DPOConfig

    # Every DPO loss type TRL documents is in the table.
    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    documented = set(re.findall(r"`'(\w+)'`", help_text))
    assert documented == set(LOSS_TYPES)


# TRL deprecates some values a case sets on purpose (`truncation_mode="keep_end"`); its warning is raised from TRL's
# `__post_init__` through our config subclass, so the suite's "no deprecated call from pivot_hf" filter would turn a
# user's deprecated value into our error. It is TRL's message about the case's input, not a call of ours.
@pytest.mark.filterwarnings("default:The `'keep_end'` truncation mode is deprecated:FutureWarning")
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_parity(case, models, tmp_path):
    if case.parent_overrides is not None:
        # TRL refuses the configuration itself (checked), and ours must give TRL's numbers of the overridden one.
        refused = run(case, True, models, tmp_path / "original")
        assert refused.error is not None, "TRL accepted the configuration the table says it refuses"
        assert refused.stage == "init" and isinstance(refused.error, ValueError), refused.error
        assert re.search(case.refused, str(refused.error)), refused.error
    theirs = run(case, True, models, tmp_path, overrides=case.parent_overrides)
    ours = run(case, False, models, tmp_path)
    assert_same(case, theirs, ours)
    if ours.accepted and case.kind in ("dpo", "sft") and "text" in case.data and case.model == "pivot":
        # Text-only rows: the tower got no gradient (as in TRL) and the run ended without the tunable-parts error.
        assert ours.trainer.tunable_parts_report["vision_tower"]["changed"] == 0


# ---------------------------------------------------------------------------------------------- right values
def _losses(trainer):
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def test_sync_ref_model_with_full_mix_in_keeps_the_loss_at_ln2(models, tmp_path):
    """TR-DPO with mix-in 1 every step: the reference is the policy at every step, so every loss is ln 2."""
    case = Case("sync", config=SYNC, steps=3, ref="none")
    trainer = build(case, False, models, str(tmp_path))
    trainer.train()
    assert _losses(trainer) == pytest.approx([math.log(2)] * 3, rel=1e-6)


def test_sync_ref_model_with_vision_precompute_is_refused_before_compute(models, tmp_path, monkeypatch):
    from pivot_hf.trainer import PivotDPOTrainer

    def _no_pass(*args, **kwargs):
        raise AssertionError("the reference pass ran before the refusal")

    monkeypatch.setattr(PivotDPOTrainer, "_run_reference_pass", _no_pass)
    case = Case("sync-precompute", config={**SYNC, "precompute_ref_log_probs": True})
    with pytest.raises(ValueError, match="sync_ref_model=True` together with `precompute_ref_log_probs=True"):
        build(case, False, models, str(tmp_path))


def test_ref_model_none_is_a_frozen_copy_of_the_policy(models, tmp_path):
    case = Case("ref-none", ref="none")
    trainer = build(case, False, models, str(tmp_path))
    ref = trainer.accelerator.unwrap_model(trainer.ref_model)
    assert ref is not trainer.model and not any(p.requires_grad for p in ref.parameters())
    policy = dict(trainer.model.named_parameters())
    vision = [n for n, _ in ref.named_parameters() if ".vision_tower." in n]
    assert vision, "the copy has the vision tower"
    for name, param in ref.named_parameters():
        assert torch.equal(param, policy[name]) and param.data_ptr() != policy[name].data_ptr(), name
    trainer.train()
    assert _losses(trainer)[0] == pytest.approx(math.log(2), rel=1e-6)  # step 1: policy == reference
    moved = [n for n in vision if not torch.equal(dict(ref.named_parameters())[n], policy[n])]
    assert moved, "the policy's tower trained while the reference stayed frozen"


def test_evaluate_and_predict_with_vision_precompute(models, tmp_path):
    """Raw datasets handed to evaluate/predict get their reference log-probs: TRL's live-reference numbers before
    training; after a step (the reference is freed) a clear refusal, as TRL's for text data."""
    eval_set = make_dataset("image", seed=1)
    live = build(Case("live", ref="none"), True, models, str(tmp_path / "live"))  # stock TRL, live reference
    expected = live.evaluate(eval_dataset=eval_set)
    precompute = {"precompute_ref_log_probs": True}
    cached = build(Case("cached", config=precompute, ref="none"), False, models, str(tmp_path / "c"))
    assert cached.ref_model is None
    assert_metrics_equal(expected, cached.evaluate(eval_dataset=eval_set), "evaluate before training")
    prediction = cached.predict(eval_set)
    assert prediction.metrics["test_loss"] == pytest.approx(expected["eval_loss"], rel=1e-6)
    cached.train()
    refusal = "(?s)cannot stand in for it \\(training has started \\(step 1\\)\\).*eval_dataset.*=False"
    with pytest.raises(ValueError, match=refusal):
        cached.evaluate(eval_dataset=make_dataset("image", seed=2))
    with pytest.raises(ValueError, match=refusal):
        cached.predict(make_dataset("image", seed=2))
    # An explicit reference with other weights than the policy: the policy cannot stand in for it even at step 0.
    other = build(Case("other", config=precompute), False, models, str(tmp_path / "o"))
    with pytest.raises(ValueError, match="reference has other weights than the policy"):
        other.evaluate(eval_dataset=eval_set)


def test_text_rows_with_default_tunable_parts_train_and_save(models, tmp_path, caplog):
    from pivot_hf import PivotForConditionalGeneration

    for kind, data in (("dpo", "text"), ("sft", "sft_text")):
        case = Case(f"{kind}-text", kind=kind, data=data, steps=2)
        with caplog.at_level("WARNING", logger="pivot_hf.trainer.tunable"):
            trainer = build(case, False, models, str(tmp_path / kind))
        assert "vision_tower" in trainer.args.tunable_parts
        assert "no images" in caplog.text  # decided from the data, at construction
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        after = dict(trainer.model.named_parameters())
        assert all(torch.equal(before[n], after[n]) for n in before if ".vision_tower." in n)
        assert any(not torch.equal(before[n], after[n]) for n in before if ".language_model." in n)
        trainer.save_model(str(tmp_path / kind / "final"))
        reloaded = PivotForConditionalGeneration.from_pretrained(str(tmp_path / kind / "final"))
        name = next(n for n in before if ".language_model." in n)
        assert torch.equal(dict(reloaded.named_parameters())[name], after[name].detach())


def test_image_rows_with_a_text_only_llm_are_refused_clearly(models, tmp_path):
    for kind, data in (("dpo", "image"), ("sft", "sft_image"), ("grpo", "grpo_image")):
        case = Case(f"{kind}-llm", kind=kind, data=data, model="text_llm")
        with pytest.raises(ValueError, match="vision-related.*Vision data needs a vision-language model"):
            build(case, False, models, str(tmp_path / kind))


def test_vision_precompute_with_an_iterable_dataset_is_refused_like_trl(models, tmp_path):
    case = Case("iterable", iterable=True, config={"precompute_ref_log_probs": True, "max_steps": 1})
    with pytest.raises(ValueError, match="not supported with IterableDataset"):
        build(case, False, models, str(tmp_path))


def test_compute_metrics_sees_trl_logits_on_padding_positions(models, tmp_path):
    """The logits handed to compute_metrics equal TRL's everywhere, padding included (not zeros there)."""
    case = Case("logits", eval="compute_metrics")
    outputs = {}
    for parent in (True, False):
        trainer = build(case, parent, models, str(tmp_path / str(parent)))
        outputs[parent] = trainer.predict(make_dataset("image", seed=1))
    theirs, ours = outputs[True].predictions, outputs[False].predictions
    theirs, ours = (x[0] if isinstance(x, tuple) else x for x in (theirs, ours))
    assert theirs.shape == ours.shape
    ids = outputs[True].label_ids
    padding = ids == models.processor(case).tokenizer.pad_token_id
    assert padding.any() and abs(theirs[padding]).sum() > 0
    assert abs(ours - theirs).max() <= 1e-4 * abs(theirs).max()


def test_a_plain_trl_config_keeps_its_values_and_gets_the_pivot_defaults(models, tmp_path):
    """TRL's own config class works with the Pivot trainers: every value the user (and TRL) set is kept, the Pivot
    fields take their defaults, and the caller's object is not changed."""
    from trl import DPOConfig, GRPOConfig

    from pivot_hf.configs import PivotDPOConfig
    from pivot_hf.trainer.grpo import PivotGRPOConfig

    for kind, data, trl_cls, pivot_cls in (
        ("dpo", "image", DPOConfig, PivotDPOConfig),
        ("grpo", "grpo_image", GRPOConfig, PivotGRPOConfig),
    ):
        case = Case(f"{kind}-plain", kind=kind, data=data, plain_config=True, ref="none", config={"beta": 0.3})
        trainer = build(case, False, models, str(tmp_path / kind))
        assert isinstance(trainer.args, pivot_cls) and trainer.args.beta == 0.3
        assert trainer.args.tunable_parts == ["vision_tower", "projector", "language_model"]
        assert trainer.args.vision_tower_lr is None and trainer.args.check_tunable_parts_changed
        # TRL's trainer sets some fields itself (e.g. `ddp_find_unused_parameters`): compare with what it ends with.
        parent = build(case, True, models, str(tmp_path / kind / "trl"))
        assert type(parent.args) is trl_cls
        theirs, ours = parent.args.to_dict(), trainer.args.to_dict()
        differ = {
            k: (v, ours[k]) for k, v in theirs.items() if k not in ("output_dir", "logging_dir") and ours[k] != v
        }
        assert not differ, differ


def test_the_callers_trl_config_is_not_changed(tmp_path):
    from transformers import TrainingArguments
    from trl import DPOConfig

    from pivot_hf.configs import PivotDPOConfig, PivotSFTConfig
    from pivot_hf.trainer.tunable import as_pivot_config

    args = DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, beta=0.3, report_to="none")
    converted = as_pivot_config(args, PivotDPOConfig)
    assert type(args) is DPOConfig and not hasattr(args, "tunable_parts")
    assert isinstance(converted, PivotDPOConfig) and converted.beta == 0.3
    # Plain TrainingArguments: SFT converts them as TRL's SFTTrainer does; DPO leaves them to TRL.
    plain = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, learning_rate=0.25, report_to="none")
    sft = as_pivot_config(plain, PivotSFTConfig)
    assert isinstance(sft, PivotSFTConfig) and sft.learning_rate == 0.25
    assert as_pivot_config(plain, PivotDPOConfig) is plain


def test_a_positional_processor_gets_the_same_preflight_as_a_keyword_one(models, tmp_path):
    """TRL's positional order reaches the model/processor contract check too (an image-token mismatch is refused)."""
    import copy

    from pivot_hf.configs import RecipeConfigError

    for kind, data in (("dpo", "image"), ("sft", "sft_image")):
        case = Case(f"{kind}-pos", kind=kind, data=data, ref="none")
        wrong = copy.copy(models.processor(case))
        wrong.image_token_id = wrong.image_token_id + 1
        for positional in (False, True):
            case.positional = positional
            with pytest.raises(RecipeConfigError, match="disagree on the image token"):
                build(case, False, models, str(tmp_path / kind), processing_class=wrong)
