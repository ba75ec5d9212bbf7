"""Tensor names of a model saved under DeepSpeed: the names a one-process save writes.

Two upstream behaviours change them; the Pivot trainers' `_save` undoes both with the helpers here:

1. ZeRO-1/2: accelerate's `get_state_dict` clones every tensor
   (`deepspeed.checkpoint.utils.clone_tensors_for_torch_save`), so tied weights (`lm_head.weight` =
   `embed_tokens.weight` with `tie_word_embeddings`) no longer share storage, and transformers'
   `remove_tied_weights_from_state_dict` writes both. `keep_tied_tensors_tied` points them at one tensor
   again, as they are in the model.
2. ZeRO-3: the renaming rules, below.

`PreTrainedModel.save_pretrained` undoes, on the state dict it writes, the weight renamings that were applied when the
model was loaded (`model._weight_conversions`, reversed by `revert_weight_conversion`), so that a checkpoint in a
legacy layout is written back in that layout. The ordinary load path records only the renamings that matched a key of
the checkpoint; the ZeRO-3 load path records every candidate. The save then "restores" prefixes the checkpoint never
had, and a Pivot model trained under ZeRO-3 writes `model.language_model.model.*` and
`model.vision_tower.vision_model.*` instead of `model.language_model.*` and `model.vision_tower.*`.

Upstream report (transformers 5.25.0, DeepSpeed 0.19.8):

    Title: ZeRO-3 load keeps every candidate weight renaming, so save_pretrained reverses renamings never applied

    `core_model_loading.convert_and_load_state_dict_in_model` ends with
        model._weight_conversions = [c for c in weight_mapping if c.was_used()]
    but `integrations/deepspeed.py:_load_state_dict_into_zero3_model` sets
        model_to_load._weight_conversions = weight_mapping
    (all candidates from `get_model_conversion_mapping`, used or not). `revert_weight_conversion` then reverses all
    of them on save. Reproduction: any composite model whose mapping includes the generic rules, e.g. a LLaVA-style
    model (`^model\\.language_model\\.model` -> `model.language_model`, the sub-model `vision_model.` PrefixChange),
    loaded with `from_pretrained` under `HfDeepSpeedConfig`/accelerate ZeRO-3 (`zero3_init_flag: true`) from a
    checkpoint already in the new layout, then `Trainer.save_model`: the written keys gain `.model` / `.vision_model`
    prefixes and no longer match the class (a plain `from_pretrained` of the result needs the legacy rules to load it,
    other tools see another model). Expected: the same filter as the ordinary path,
        model_to_load._weight_conversions = [c for c in weight_mapping if c.was_used()]
    (`rename_source_key` sets `_was_used` on the ZeRO-3 path too).

Until that is fixed upstream, `only_used_weight_conversions` applies that filter for the duration of a save.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

from .compat import used_weight_conversions_only


def keep_tied_tensors_tied(state_dict: dict | None, model) -> dict | None:
    """`state_dict` with the entries of parameters tied in `model` (one `Parameter` under several names) sharing one
    tensor again, so the save drops the aliases as a one-process save does. Entries are not copied; `None` stays."""
    if not state_dict:
        return state_dict
    names_by_param: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_by_param.setdefault(id(param), []).append(name)
    fixed = dict(state_dict)
    for names in names_by_param.values():
        present = [n for n in names if n in fixed]
        for name in present[1:]:
            fixed[name] = fixed[present[0]]
    return fixed


@contextmanager
def only_used_weight_conversions(*models):
    """While active, each model's recorded load-time renamings are restricted to those that matched a key at load (what
    the ordinary load path records), so `save_pretrained` writes the names a one-process save writes. A no-op for a
    model loaded outside ZeRO-3 or built from a config; the recorded list is put back on exit."""
    with ExitStack() as stack:
        for model in {id(m): m for m in models if m is not None}.values():
            stack.enter_context(used_weight_conversions_only(model))
        yield


__all__ = ["keep_tied_tensors_tied", "only_used_weight_conversions"]
