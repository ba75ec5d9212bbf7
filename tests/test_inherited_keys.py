"""No silent keys: every field of TRL's configs (read from the installed TRL) and of pivot-hf's own is decided in
`pivot_hf.inherited_keys.KEY_DECISIONS`, and every refused one is refused by name when the config is built."""

import dataclasses

import pytest
import trl

from pivot_hf.configs import (
    PivotDPOConfig,
    PivotModelConfig,
    PivotScriptArguments,
    PivotSFTConfig,
    RecipeConfigError,
)
from pivot_hf.inherited_keys import HONOURED, KEY_DECISIONS, REFUSED, check_keys, decision, undecided_fields
from pivot_hf.trainer.grpo import PivotGRPOConfig, PivotGRPOScriptArguments


TRL_CLASSES = [trl.ModelConfig, trl.ScriptArguments, trl.SFTConfig, trl.DPOConfig, trl.GRPOConfig]
PIVOT_CLASSES = [
    PivotModelConfig,
    PivotScriptArguments,
    PivotGRPOScriptArguments,
    PivotSFTConfig,
    PivotDPOConfig,
    PivotGRPOConfig,
]


def _build(cls, tmp_path, **values):
    if issubclass(cls, trl.ScriptArguments):
        return cls(dataset_name="x", **values)
    if issubclass(cls, trl.ModelConfig):
        return cls(model_name_or_path="x", **values)
    return cls(output_dir=str(tmp_path), report_to="none", **values)


def _undecided(classes) -> dict[str, list[str]]:
    return {cls.__name__: undecided_fields(cls) for cls in classes if undecided_fields(cls)}


def test_every_inherited_and_own_field_is_decided():
    assert _undecided(TRL_CLASSES + PIVOT_CLASSES) == {}
    for entry in KEY_DECISIONS.values():
        assert entry.status in (HONOURED, REFUSED) and entry.why
        assert (entry.example is not None) == (entry.status == REFUSED)


def test_a_new_trl_field_fails_until_decided(tmp_path):
    @dataclasses.dataclass
    class NewTRLDPOConfig(trl.DPOConfig):
        brand_new_trl_key: int = 0

    @dataclasses.dataclass
    class FutureDPOConfig(NewTRLDPOConfig, PivotDPOConfig):
        def __post_init__(self):
            PivotDPOConfig.__post_init__(self)

    # The enumeration above fails on it...
    assert _undecided([NewTRLDPOConfig, FutureDPOConfig]) == {
        "NewTRLDPOConfig": ["brand_new_trl_key"],
        "FutureDPOConfig": ["brand_new_trl_key"],
    }
    # ... and a run that sets it is refused by name; left at its default it changes nothing, so it may stay.
    with pytest.raises(RecipeConfigError, match="`brand_new_trl_key`.*not decided"):
        _build(FutureDPOConfig, tmp_path, brand_new_trl_key=1)
    _build(FutureDPOConfig, tmp_path)


@pytest.mark.parametrize("cls", PIVOT_CLASSES, ids=lambda c: c.__name__)
def test_refused_keys_are_refused_by_name_when_the_config_is_built(cls, tmp_path):
    _build(cls, tmp_path)  # every default is accepted
    refused = [f.name for f in dataclasses.fields(cls) if decision(cls, f.name).status == REFUSED]
    assert refused
    for name in refused:
        with pytest.raises(RecipeConfigError, match=f"`{name}`: not supported"):
            _build(cls, tmp_path, **{name: decision(cls, name).example})


def test_per_trainer_decisions(tmp_path):
    # Transformers' label smoothing acts on the Trainer's loss (SFT) but not on TRL's DPO/GRPO losses.
    _build(PivotSFTConfig, tmp_path, label_smoothing_factor=0.1)
    for cls in (PivotDPOConfig, PivotGRPOConfig):
        with pytest.raises(RecipeConfigError, match="`label_smoothing_factor`"):
            _build(cls, tmp_path, label_smoothing_factor=0.1)
    _build(PivotDPOConfig, tmp_path, padding_free=True)
    with pytest.raises(RecipeConfigError, match="`padding_free`"):
        _build(PivotSFTConfig, tmp_path, padding_free=True)


def test_all_problems_are_listed_at_once():
    config = PivotModelConfig(model_name_or_path="x")
    config.lora_task_type, config.lora_target_parameters = "SEQ_CLS", ["w"]
    with pytest.raises(RecipeConfigError) as err:
        check_keys(config)
    assert "`lora_task_type`" in str(err.value) and "`lora_target_parameters`" in str(err.value)


def test_bnb_4bit_keys_without_load_in_4bit_are_refused():
    with pytest.raises(RecipeConfigError, match="bnb_4bit_quant_type.*load_in_4bit"):
        PivotModelConfig(model_name_or_path="x", bnb_4bit_quant_type="fp4")


def test_recipe_refuses_a_refused_key_before_loading(tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    from dpo import main as dpo_main
    from pivot_hf import PivotForConditionalGeneration

    monkeypatch.setattr(PivotForConditionalGeneration, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    argv = ["--model_name_or_path", "x", "--dataset_name", "x", "--output_dir", str(tmp_path)]
    with pytest.raises(RecipeConfigError, match="`dataset_streaming`"):
        dpo_main(argv + ["--dataset_streaming", "true"])


@pytest.mark.parametrize(
    "trl_cls, pivot_cls",
    [(trl.DPOConfig, PivotDPOConfig), (trl.SFTConfig, PivotSFTConfig), (trl.GRPOConfig, PivotGRPOConfig)],
    ids=lambda c: c.__name__,
)
def test_a_built_trl_config_is_accepted_and_its_refused_keys_still_refused(trl_cls, pivot_cls, tmp_path):
    """A TRL config passed to a Pivot trainer already ran TRL's `__post_init__`, which resolves some defaults
    (`pad_to_multiple_of="auto"` -> None): those are still defaults, while a refused key set by the user is not."""
    from pivot_hf.trainer.tunable import as_pivot_config

    placement = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    assert isinstance(as_pivot_config(trl_cls(**placement), pivot_cls), pivot_cls)
    refused = [f.name for f in dataclasses.fields(pivot_cls) if decision(pivot_cls, f.name).status == REFUSED]
    name = "pad_to_multiple_of" if "pad_to_multiple_of" in refused else refused[0]
    with pytest.raises(RecipeConfigError, match=f"`{name}`: not supported"):
        as_pivot_config(trl_cls(**placement, **{name: decision(pivot_cls, name).example}), pivot_cls)


@pytest.mark.parametrize("name", ["SFTConfig", "DPOConfig", "GRPOConfig"])
def test_a_trl_config_left_at_its_defaults_converts_to_the_pivot_config(tmp_path, name):
    """TRL resolves its "auto" defaults (pad_to_multiple_of) in `__post_init__`; a TRL config handed to a Pivot trainer
    is converted after that and must not be refused for a key the caller never set."""
    import trl

    from pivot_hf.trainer.tunable import as_pivot_config

    kwargs = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    if name == "GRPOConfig":
        kwargs.update(per_device_train_batch_size=2, num_generations=2)
    args = getattr(trl, name)(**kwargs)
    pivot_cls = {"SFTConfig": PivotSFTConfig, "DPOConfig": PivotDPOConfig, "GRPOConfig": PivotGRPOConfig}[name]
    converted = as_pivot_config(args, pivot_cls)
    assert isinstance(converted, pivot_cls)
    assert converted.pad_to_multiple_of is None
