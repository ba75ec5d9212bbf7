"""Processor of the Pivot MLLM: the encoder's image processor + the LLM's tokenizer, `<image>` expanded per image.

Like `modeling_pivot.py`, this file imports nothing from pivot_hf outside of itself (it travels with checkpoints).
"""

from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
from transformers.processing_utils import MultiModalData, ProcessorMixin


DEFAULT_IMAGE_TOKEN = "<image>"
_UNSET = object()
# The official PIVOT recipe (LLaVA-NeXT's qwen_1_5 conversation) uses this system prompt.
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# For base LLMs that ship no chat template: ChatML, the format of the official recipe (LLaVA-NeXT's qwen_1_5).
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def multimodal_chat_template(text_template: str, image_token: str, system_prompt: str | None) -> str:
    """Wrap an LLM's own chat template so it accepts multimodal messages.

    Messages whose `content` is a list of parts (`{"type": "image"}`, `{"type": "text", "text": ...}`, as TRL and
    transformers produce them) are flattened to strings first: an image part becomes `<image>\\n`, where the official
    recipe puts it. The LLM's template is then applied unchanged, so every LLM (ChatML for Qwen, Llama's, ...) keeps
    its own format. Any other part type (e.g. `input_image`; transformers maps OpenAI's `image_url` to an image part)
    is an error naming it and the accepted ones, never dropped. Written with immutable Jinja operations only (transformers renders in a sandbox).
    """
    image_literal = image_token.replace("\\", "\\\\").replace("'", "\\'")
    header = ["{%- set _pivot = namespace(messages=[]) -%}"]
    if system_prompt:
        literal = system_prompt.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
        header.append(
            "{%- if messages | length == 0 or messages[0]['role'] != 'system' -%}"
            "{%- set _pivot.messages = [{'role': 'system', 'content': '" + literal + "'}] -%}{%- endif -%}"
        )
    header.append(
        "{%- for _message in messages -%}"
        "{%- if _message['content'] is string or _message['content'] is none -%}"
        "{%- set _pivot.messages = _pivot.messages + [_message] -%}"
        "{%- else -%}"
        "{%- set _text = namespace(value='') -%}"
        "{%- for _part in _message['content'] -%}"
        "{%- if _part['type'] == 'image' -%}{%- set _text.value = _text.value + '" + image_literal + "\\n' -%}"
        "{%- elif _part['type'] == 'text' -%}{%- set _text.value = _text.value + _part['text'] -%}"
        # Any other part type would vanish silently (e.g. `input_image`: an image with 0 image tokens).
        "{%- else -%}{{- raise_exception('Unknown content part type ' ~ (_part['type'] | string) ~ ': accepted "
        "types are image and text (transformers maps an OpenAI image_url part to image)') -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set _pivot.messages = _pivot.messages + [{'role': _message['role'], 'content': _text.value}] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set messages = _pivot.messages -%}"
    )
    return "".join(header) + text_template


def _naflex_tokens(image_processor, width: int, height: int) -> int | None:
    """SigLIP2 NaFlex: patches of the size the image processor resizes to (None: fall back to processing an image)."""
    try:
        from transformers.models.siglip2.image_processing_pil_siglip2 import get_image_size_for_max_num_patches
    except ImportError:
        return None
    patch = getattr(image_processor, "patch_size", None)
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    if not patch:
        return None
    target_h, target_w = get_image_size_for_max_num_patches(
        max(1, height), max(1, width), patch, image_processor.max_num_patches
    )
    return (target_h // patch) * (target_w // patch)


class PivotProcessor(ProcessorMixin):
    r"""
    Image processor of the vision encoder + tokenizer of the LLM. Each `<image>` in the text becomes as many image
    tokens as the encoder produces for that image: `(H / patch) * (W / patch)` for fixed-resolution towers, the valid
    patches of `spatial_shapes` for SigLIP2 NaFlex.

    Args:
        image_processor: the encoder's image processor.
        tokenizer: the LLM's tokenizer, with `image_token` added as a special token.
        patch_size (`int`): patch size of the vision tower.
        image_token (`str`, defaults to `"<image>"`): placeholder token.
        chat_template (`str`, *optional*): a multimodal chat template (see `multimodal_chat_template`).
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        patch_size=None,
        image_token=DEFAULT_IMAGE_TOKEN,
        chat_template=None,
    ):
        self.patch_size = patch_size
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token) if tokenizer is not None else None
        if tokenizer is not None:
            # Lets a model composed with `tokenizer=processor.tokenizer` find a custom image token (not saved to disk).
            tokenizer.image_token = image_token
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self._count_image_tokens(image_inputs, image_idx)

    def _count_image_tokens(self, image_inputs: dict, image_idx: int) -> int:
        if "spatial_shapes" in image_inputs:  # SigLIP2 NaFlex: a variable patch grid per image
            height, width = (int(v) for v in image_inputs["spatial_shapes"][image_idx])
            return height * width
        if self.patch_size is None:
            raise ValueError("PivotProcessor needs `patch_size` (the vision tower's) to count image tokens.")
        pixel_values = image_inputs["pixel_values"][image_idx]
        height, width = pixel_values.shape[-2:]
        return (height // self.patch_size) * (width // self.patch_size)

    @property
    def variable_resolution(self) -> bool:
        """Whether the image-token count depends on each image's size (SigLIP2 NaFlex with `max_num_patches`)."""
        return getattr(self.image_processor, "max_num_patches", None) is not None

    def num_image_tokens(self, image: Image.Image | tuple[int, int] | None = None) -> int:
        """Image tokens for one image (or its `(width, height)`); fixed-resolution towers ignore the size.

        Data pipelines use it to drop rows whose text plus image tokens cannot fit `max_length` before training; with a
        variable-resolution tower they measure each row's images (`variable_resolution`), since a non-square image can
        have more tokens than a square one. Without an image, a variable-resolution tower answers its maximum
        (`max_num_patches`): a bound that no image exceeds, never a count that a tall image would overrun.
        """
        if isinstance(image, Image.Image) and self.variable_resolution:
            image = image.size
        if image is None and self.variable_resolution:
            return int(self.image_processor.max_num_patches)
        if isinstance(image, tuple) and self.variable_resolution:
            count = _naflex_tokens(self.image_processor, int(image[0]), int(image[1]))
            if count is not None:
                return count
        if image is None or isinstance(image, tuple):
            width, height = image if isinstance(image, tuple) else (64, 64)
            image = Image.new("RGB", (max(1, int(width)), max(1, int(height))))
        processed = self.image_processor(images=[image.convert("RGB")], return_tensors="np")
        return self._count_image_tokens(processed, 0)

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        """Placeholder tokens per image, what serving engines (vLLM) ask a processor for before processing.

        `image_sizes`: one `(height, width)` per image. Each image is one patch (no tiling). The counts are those the
        processor writes (`num_image_tokens`), so they depend on each size only for SigLIP2 NaFlex. Processing options
        in `kwargs` (e.g. `max_num_patches`) are applied as the processor call applies them; an option the image
        processor does not have is refused by name.
        """
        if kwargs:
            import copy

            unknown = sorted(k for k in kwargs if not hasattr(self.image_processor, k))
            if unknown:
                raise ValueError(
                    f"{type(self.image_processor).__name__} has no processing option(s) {unknown}; image-token counts "
                    "depend only on its own settings."
                )
            counter = copy.copy(self)
            counter.image_processor = copy.copy(self.image_processor)
            for key, value in kwargs.items():
                setattr(counter.image_processor, key, value)
            return counter._get_num_multimodal_tokens(image_sizes)
        if image_sizes is None:
            return MultiModalData()
        if self.variable_resolution:
            counts = [self.num_image_tokens((int(width), int(height))) for height, width in image_sizes]
        else:
            counts = [self.num_image_tokens()] * len(image_sizes)
        return MultiModalData(num_image_tokens=counts, num_image_patches=[1] * len(counts))

    def _sub_processors(self) -> list:
        """The image processor (and any other non-tokenizer attribute): what `save_pretrained` writes into
        processor_config.json sections."""
        return [
            getattr(self, name) for name in self.get_attributes() if not hasattr(getattr(self, name), "init_kwargs")
        ]

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """transformers' save, leaving this processor as it was. The remote-code saver (`custom_object_save`) sets
        `auto_map` on the processor and on its image processor in memory so that they get written; the processor's
        goes to processor_config.json (that is what `AutoProcessor(..., trust_remote_code=True)` reads), the image
        processor's is not written (`to_dict`), and both are removed again, so `save_pretrained` followed by
        `from_pretrained` gives an equal processor."""
        objects = [self, *self._sub_processors()]
        before = [obj.__dict__.get("auto_map", _UNSET) for obj in objects]
        try:
            return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        finally:
            for obj, value in zip(objects, before):
                if value is _UNSET:
                    if "auto_map" in vars(obj):
                        delattr(obj, "auto_map")
                else:
                    obj.auto_map = value

    def to_dict(self) -> dict:
        """transformers' dict, without this class's `AutoProcessor` entry inside the sub-processors' sections (older
        checkpoints carry it there: it maps nothing for an image processor)."""
        output = super().to_dict()
        for name in self.get_attributes():
            section = output.get(name)
            if isinstance(section, dict) and isinstance(section.get("auto_map"), dict):
                auto_map = {k: v for k, v in section["auto_map"].items() if k != "AutoProcessor"}
                if auto_map:
                    section["auto_map"] = auto_map
                else:
                    del section["auto_map"]
        return output

    @property
    def model_input_names(self):
        names = list(self.tokenizer.model_input_names) + list(self.image_processor.model_input_names)
        return list(dict.fromkeys(names))

    @classmethod
    def from_vision_text_pretrained(
        cls,
        vision_model_name_or_path: str,
        text_model_name_or_path: str,
        image_token: str = DEFAULT_IMAGE_TOKEN,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        vision_kwargs: dict | None = None,
        text_kwargs: dict | None = None,
        image_processor_kwargs: dict | None = None,
    ) -> "PivotProcessor":
        """Compose the processor of a new Pivot MLLM from the encoder's and the LLM's checkpoints.

        Adds `image_token` to the tokenizer (as a special token), gives it a pad token if it has none, and wraps the
        LLM's chat template so multimodal messages work (`system_prompt` is inserted when a conversation has none;
        `None` keeps the LLM's own default).
        """
        vision_kwargs = dict(vision_kwargs or {})
        image_processor = AutoImageProcessor.from_pretrained(
            vision_model_name_or_path, **vision_kwargs, **(image_processor_kwargs or {})
        )
        tokenizer = AutoTokenizer.from_pretrained(text_model_name_or_path, **(text_kwargs or {}))
        vision_config = AutoConfig.from_pretrained(vision_model_name_or_path, **vision_kwargs)
        vision_config = getattr(vision_config, "vision_config", None) or vision_config
        patch_size = vision_config.patch_size
        patch_size = patch_size[0] if isinstance(patch_size, (list, tuple)) else patch_size
        return cls.from_image_processor_and_tokenizer(
            image_processor, tokenizer, patch_size=patch_size, image_token=image_token, system_prompt=system_prompt
        )

    @classmethod
    def from_image_processor_and_tokenizer(
        cls,
        image_processor,
        tokenizer,
        patch_size: int,
        image_token: str = DEFAULT_IMAGE_TOKEN,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    ) -> "PivotProcessor":
        text_template = prepare_tokenizer(tokenizer, image_token)
        chat_template = multimodal_chat_template(text_template, image_token, system_prompt)
        return cls(
            image_processor, tokenizer, patch_size=patch_size, image_token=image_token, chat_template=chat_template
        )


def prepare_tokenizer(tokenizer, image_token: str = DEFAULT_IMAGE_TOKEN) -> str:
    """Make an LLM's tokenizer the tokenizer of a Pivot MLLM, in place; return the text chat template.

    The one rule both `from_vision_text_pretrained`s (processor and model) follow, so they agree by construction:
    `image_token` becomes a special token (its id is the tokenizer's: `len(tokenizer)` before adding it, which for
    Qwen2.5 is 151,665, inside the model's 151,936 embedding rows), a missing pad token becomes the EOS token, and a
    base LLM without a chat template gets ChatML with `<|im_start|>`/`<|im_end|>` added as special tokens. The model
    then sizes its embeddings to `max(vocab_size, len(tokenizer))`, so every added token has a row. Idempotent.
    """
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]}, replace_extra_special_tokens=False)
    # Read back by `PivotForConditionalGeneration.from_vision_text_pretrained(..., tokenizer=...)` (custom tokens).
    tokenizer.image_token = image_token
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so any existing token serves.
        tokenizer.pad_token = tokenizer.eos_token
    text_template = tokenizer.chat_template
    if isinstance(text_template, dict):
        text_template = text_template.get("default")
    if not text_template:
        # A base LLM without a template: ChatML, with its markers added as special tokens so they stay atomic.
        text_template = CHATML_TEMPLATE
        missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
        tokenizer.chat_template = text_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|im_end|>"
    return text_template


__all__ = [
    "PivotProcessor",
    "multimodal_chat_template",
    "prepare_tokenizer",
    "DEFAULT_IMAGE_TOKEN",
    "DEFAULT_SYSTEM_PROMPT",
]
