"""The saved tensor names under DeepSpeed, without launching it. transformers' ZeRO-3 load path records every
candidate renaming rule on the model (the ordinary path only those that matched a checkpoint key), and
`save_pretrained` reverses what is recorded; accelerate's ZeRO-1/2 state dict clones tied weights apart. The Pivot
trainers' `_save` must bring the names back to a one-process save's and leave the model as it was. The 2-process runs
are in tests/test_distributed_zero3.py."""

import pytest
from safetensors import safe_open
from transformers.conversion_mapping import get_model_conversion_mapping

from pivot_hf import PivotForConditionalGeneration
from pivot_hf.trainer.deepspeed_save import only_used_weight_conversions


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _names(folder) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_names_of_a_model_carrying_every_candidate_rule(tiny_pivot_factory, tmp_path):
    model = PivotForConditionalGeneration.from_pretrained(tiny_pivot_factory("siglip"))
    model.save_pretrained(tmp_path / "plain")
    expected = _names(tmp_path / "plain")
    # What `_load_state_dict_into_zero3_model` leaves on the model: all candidates, none used.
    candidates = get_model_conversion_mapping(model)
    assert candidates and not any(c.was_used() for c in candidates)
    model._weight_conversions = candidates

    model.save_pretrained(tmp_path / "as_transformers_saves")
    wrong = _names(tmp_path / "as_transformers_saves")
    if wrong == expected:  # pragma: no cover - the day transformers fixes it, this test says so
        pytest.fail("transformers no longer reverses unused renamings: the workaround in deepspeed_save can go")
    assert any(k.startswith("model.language_model.model.") for k in wrong), sorted(wrong)[:5]

    with only_used_weight_conversions(model, None):
        model.save_pretrained(tmp_path / "fixed")
    assert _names(tmp_path / "fixed") == expected
    assert model._weight_conversions is candidates  # the model is left as it was


def test_used_rules_are_kept(tiny_pivot_factory):
    model = PivotForConditionalGeneration.from_pretrained(tiny_pivot_factory("siglip"))
    candidates = get_model_conversion_mapping(model)
    candidates[-1]._was_used = True  # as `rename_source_key` marks a rule that matched a checkpoint key
    model._weight_conversions = candidates
    with only_used_weight_conversions(model):
        assert model._weight_conversions == [candidates[-1]]
    assert model._weight_conversions is candidates


def test_tied_weights_cloned_apart_are_saved_once(tiny_pivot_factory, tmp_path):
    """accelerate's ZeRO-1/2 state dict is a clone of every tensor: tied weights no longer share storage and would
    both be written (`lm_head.weight`). Re-tied, the save has the names of a one-process save."""
    from deepspeed.checkpoint.utils import clone_tensors_for_torch_save

    from pivot_hf.trainer.deepspeed_save import keep_tied_tensors_tied

    model = PivotForConditionalGeneration.from_pretrained(tiny_pivot_factory("siglip"))
    assert model.config.text_config.tie_word_embeddings
    model.save_pretrained(tmp_path / "plain")
    cloned = clone_tensors_for_torch_save(model.state_dict())
    model.save_pretrained(tmp_path / "cloned", state_dict=cloned)
    assert _names(tmp_path / "cloned") - _names(tmp_path / "plain") == {"lm_head.weight"}
    model.save_pretrained(tmp_path / "retied", state_dict=keep_tied_tensors_tied(cloned, model))
    assert _names(tmp_path / "retied") == _names(tmp_path / "plain")
