"""What differs between the transformers versions the Pivot model files support, in one place.

Imported by `modeling_pivot.py` as a relative import, so transformers' remote-code loader copies it next to every saved
checkpoint with the model file: it imports only `torch`, `transformers` and the standard library. Everything here is
read from transformers' public classes once, at import.

- transformers 5.24 renamed the key/value cache argument and output field `past_key_values` -> `cache` (the old
  argument name is deprecated with a `FutureWarning`) and replaced the LLaVA output field `image_hidden_states` (the
  projected visual tokens) by `image_outputs` (the encoder's `BaseModelOutputWithPooling`, one projected tensor per image
  in `pooler_output`).
"""

import dataclasses
import functools

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast, LlavaModelOutputWithPast


_OUTPUT_FIELDS = {field.name for field in dataclasses.fields(LlavaModelOutputWithPast)}
CACHE_ARGUMENT = "cache" if "cache" in _OUTPUT_FIELDS else "past_key_values"
HAS_IMAGE_OUTPUTS = "image_outputs" in _OUTPUT_FIELDS


def accepts_old_cache_name(forward):
    """Decorate a `forward(..., cache=None, ...)` so that it also takes the installed transformers' other spelling.

    Where transformers names the argument `cache`, `past_key_values=` is renamed with transformers' own deprecation
    warning (`deprecate_kwarg`, as LLaVA's forward does); where `past_key_values` is still the current name (and what
    `generate` passes), it is renamed silently.
    """
    if CACHE_ARGUMENT == "cache":
        from transformers.utils.deprecation import deprecate_kwarg

        return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)

    @functools.wraps(forward)
    def renamed(*args, **kwargs):
        if "past_key_values" in kwargs:
            kwargs["cache"] = kwargs.pop("past_key_values")
        return forward(*args, **kwargs)

    return renamed


def image_outputs_from_features(image_features) -> BaseModelOutputWithPooling | None:
    """Already projected visual tokens (one tensor per image, or one `(images, tokens, hidden)` tensor) as the
    `image_outputs` a model output carries: one `(tokens_i, hidden)` tensor per image in `pooler_output`."""
    if image_features is None:
        return None
    if torch.is_tensor(image_features) and image_features.dim() < 3:
        # transformers < 5.24 carries the tokens of all images as one concatenated tensor: keep it whole.
        image_features = [image_features]
    return BaseModelOutputWithPooling(pooler_output=list(image_features))


def _image_fields(image_outputs) -> dict:
    if HAS_IMAGE_OUTPUTS:
        return {"image_outputs": image_outputs}
    if image_outputs is None:
        return {"image_hidden_states": None}
    # Before 5.24: the projected tokens of all images, concatenated, as LLaVA returned them.
    return {"image_hidden_states": torch.cat(list(image_outputs.pooler_output), dim=0)}


def model_output(
    last_hidden_state, cache=None, hidden_states=None, attentions=None, image_features=None, image_outputs=None
) -> LlavaModelOutputWithPast:
    """A `LlavaModelOutputWithPast` in the installed transformers' spelling.

    `image_outputs`: what `get_image_features` returned; or `image_features`: the projected visual tokens alone (one
    `(tokens_i, hidden)` tensor per image).
    """
    if image_outputs is None:
        image_outputs = image_outputs_from_features(image_features)
    fields = {"last_hidden_state": last_hidden_state, "hidden_states": hidden_states, "attentions": attentions}
    fields[CACHE_ARGUMENT] = cache
    return LlavaModelOutputWithPast(**fields, **_image_fields(image_outputs))


def causal_lm_output(loss, logits, outputs: LlavaModelOutputWithPast) -> LlavaCausalLMOutputWithPast:
    """A `LlavaCausalLMOutputWithPast` around a `model_output`, in the installed transformers' spelling."""
    fields = {"loss": loss, "logits": logits, "hidden_states": outputs.hidden_states, "attentions": outputs.attentions}
    fields[CACHE_ARGUMENT] = cache_from_output(outputs)
    if HAS_IMAGE_OUTPUTS:
        fields["image_outputs"] = outputs.image_outputs
    else:
        fields["image_hidden_states"] = outputs.image_hidden_states
    return LlavaCausalLMOutputWithPast(**fields)


def output_image_features(output):
    """The projected visual tokens a Pivot/LLaVA model output carries (a list with one tensor per image from 5.24 on,
    one concatenated tensor before), or None."""
    if HAS_IMAGE_OUTPUTS:
        image_outputs = getattr(output, "image_outputs", None)
        return None if image_outputs is None else image_outputs.pooler_output
    return getattr(output, "image_hidden_states", None)


def cache_from_output(output):
    """The key/value cache of a model output, whatever the transformers version."""
    return getattr(output, CACHE_ARGUMENT, None)


__all__ = [
    "CACHE_ARGUMENT",
    "HAS_IMAGE_OUTPUTS",
    "accepts_old_cache_name",
    "cache_from_output",
    "causal_lm_output",
    "image_outputs_from_features",
    "model_output",
    "output_image_features",
]
