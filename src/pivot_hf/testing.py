"""Tiny offline checkpoints for tests, the demo and benchmarks: one per vision family, tiny LLMs, tiny Pivot MLLMs.

Each builder writes a local folder laid out exactly like a Hub checkpoint (config + safetensors + processor files), so
the real loading code (`from_pretrained` on a Hub id or a folder) is what gets exercised. Weights are random but
seeded, so two builds with the same arguments are identical.
"""

import json
import os
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    BitImageProcessorPil,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Siglip2ImageProcessorPil,
    Siglip2VisionConfig,
    Siglip2VisionModel,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTImageProcessorPil,
    ViTMAEConfig,
    ViTMAEModel,
    ViTModel,
)


VISION_FAMILIES = (
    "siglip",
    "siglip_dual",
    "siglip2_naflex",
    "clip",
    "dinov2",
    "dinov2_registers",
    "vit",
    "vit_mae",
)
# Image tokens each tiny tower gives a 32 px image (patch 8 -> 4x4 grid); NaFlex depends on the aspect ratio.
TINY_IMAGE_SIZE = 32
TINY_PATCH_SIZE = 8


def real_config_path(name: str) -> str:
    """A real-shaped config shipped with the package (`resources/configs/<name>.json`, see its README)."""
    path = resources.files("pivot_hf") / "resources" / "configs" / f"{name}.json"
    if not path.is_file():
        available = sorted(p.name[: -len(".json")] for p in path.parent.iterdir() if p.name.endswith(".json"))
        raise FileNotFoundError(f"No real config named {name!r}; available: {available}")
    return str(path)


def real_shape_pivot_config(vision: str = "siglip2-so400m-patch16-384", text: str = "Qwen2.5-1.5B-Instruct", **kwargs):
    """The PivotConfig of a paper-sized model (for the meta device, parameter counts and benchmarks)."""
    import json

    from .configuration_pivot import PivotConfig

    vision_config = json.loads(Path(real_config_path(f"{vision}.vision")).read_text())
    text_config = json.loads(Path(real_config_path(text)).read_text())
    kwargs.setdefault("image_token_index", text_config["vocab_size"] - 1)
    return PivotConfig(
        vision_config=vision_config,
        text_config=text_config,
        tie_word_embeddings=text_config.get("tie_word_embeddings", False),
        **kwargs,
    )


def qwen_tokenizer_path() -> str:
    """The real Qwen2.5 tokenizer shipped with the package (byte-identical to the official files)."""
    return str(resources.files("pivot_hf") / "resources" / "qwen2.5-tokenizer")


def small_qwen_tokenizer(path: str | os.PathLike, texts: Iterable[str]) -> str:
    """Write the Qwen2.5 tokenizer cut down to what `texts` need to `path`; return the path.

    The vocabulary keeps the 256 byte-level symbols, every token the full tokenizer gives `texts`, every token those
    are merged from, and the special tokens; the merges keep those between kept tokens, in their order. BPE then takes
    the same merges as the full tokenizer on `texts` (each merge it applied is kept and none ranks ahead of it that did
    not before), so `texts` tokenize to the same token strings, and any other text falls back to shorter pieces, down
    to single bytes. Ids are renumbered (0..K-1, special tokens last). Why: a random LLM over 151,665 tokens spends
    almost all of a CPU step in the output layer; over a few hundred it does not.
    """
    from tokenizers import Tokenizer
    from tokenizers.pre_tokenizers import ByteLevel

    source = Path(qwen_tokenizer_path())
    spec = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    made_from = {}
    for a, b in pairs:
        made_from.setdefault(a + b, (a, b))
    special = {t["content"] for t in spec["added_tokens"]}
    full = Tokenizer.from_file(str(source / "tokenizer.json"))
    keep = set(ByteLevel.alphabet())
    todo = [t for text in texts for t in full.encode(text, add_special_tokens=False).tokens if t not in special]
    while todo:
        token = todo.pop()
        if token not in keep:
            keep.add(token)
            todo.extend(made_from.get(token, ()))
    kept = sorted(keep, key=vocab.__getitem__)
    spec["model"]["vocab"] = {token: i for i, token in enumerate(kept)}
    spec["model"]["merges"] = [[a, b] for a, b in pairs if a in keep and b in keep and a + b in keep]
    new_id = {}
    for i, added in enumerate(spec["added_tokens"]):
        new_id[str(added["id"])] = added["id"] = len(kept) + i
    config["added_tokens_decoder"] = {str(new_id[k]): v for k, v in config["added_tokens_decoder"].items()}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return str(path)


def _vit_kwargs(hidden_size: int, num_layers: int) -> dict:
    return {
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 2,
        "image_size": TINY_IMAGE_SIZE,
        "patch_size": TINY_PATCH_SIZE,
    }


def _image_processor_kwargs() -> dict:
    size = {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    return {"size": size, "do_resize": True}


def _crop_processor_kwargs() -> dict:
    """Resize the short side, then centre-crop: CLIP's and DINOv2's preprocessing."""
    return {
        "size": {"shortest_edge": TINY_IMAGE_SIZE},
        "crop_size": {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
    }


def _dual_text_kwargs(hidden_size: int) -> dict:
    """The (unused) text half of a tiny dual encoder: what PIVOT composition must skip."""
    return {
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "vocab_size": 64,
        "max_position_embeddings": 16,
    }


def build_tiny_vision(
    path: str | os.PathLike, family: str = "siglip", hidden_size: int = 32, num_layers: int = 3, seed: int = 0
) -> str:
    """Write a tiny random vision checkpoint of `family` (model + image processor) to `path`."""
    torch.manual_seed(seed)
    kw = _vit_kwargs(hidden_size, num_layers)
    if family == "siglip":
        model = SiglipVisionModel(SiglipVisionConfig(**kw))
        processor = SiglipImageProcessorPil(**_image_processor_kwargs())
    elif family == "siglip_dual":  # a full dual encoder, as `google/siglip2-so400m-patch16-384` is on the Hub
        model = SiglipModel(SiglipConfig(vision_config=kw, text_config=_dual_text_kwargs(hidden_size)))
        processor = SiglipImageProcessorPil(**_image_processor_kwargs())
    elif family == "siglip2_naflex":
        naflex = {k: v for k, v in kw.items() if k != "image_size"}
        model = Siglip2VisionModel(Siglip2VisionConfig(num_patches=16, **naflex))
        processor = Siglip2ImageProcessorPil(patch_size=TINY_PATCH_SIZE, max_num_patches=16)
    elif family == "clip_dual":  # a full CLIP, as `openai/clip-vit-large-patch14-336` is on the Hub
        text = _dual_text_kwargs(hidden_size)
        model = CLIPModel(CLIPConfig(vision_config=kw, text_config=text, projection_dim=hidden_size))
        processor = CLIPImageProcessorPil(**_crop_processor_kwargs())
    elif family == "clip":
        model = CLIPVisionModel(CLIPVisionConfig(**kw))
        processor = CLIPImageProcessorPil(**_crop_processor_kwargs())
    elif family == "dinov2":
        model = Dinov2Model(Dinov2Config(**kw))
        processor = BitImageProcessorPil(**_crop_processor_kwargs())
    elif family == "dinov2_registers":
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **kw))
        processor = BitImageProcessorPil(**_crop_processor_kwargs())
    elif family == "vit":
        model = ViTModel(ViTConfig(**kw))
        processor = ViTImageProcessorPil(**_image_processor_kwargs())
    elif family == "vit_mae":
        model = ViTMAEModel(ViTMAEConfig(mask_ratio=0.75, **kw))
        processor = ViTImageProcessorPil(**_image_processor_kwargs())
    else:
        raise ValueError(f"Unknown tiny vision family {family!r}; choose from {VISION_FAMILIES}.")
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


# The real Qwen2.5 checkpoints pad their embedding matrix past the tokenizer (151,936 rows for 151,665 tokens).
QWEN_VOCAB_SIZE = 151936


def build_tiny_llm(
    path: str | os.PathLike,
    arch: str = "qwen2",
    hidden_size: int = 32,
    num_layers: int = 2,
    seed: int = 0,
    tokenizer_path: str | os.PathLike | None = None,
) -> str:
    """Write a tiny random causal LM with the real Qwen2.5 tokenizer to `path`, with the quirks of real checkpoints.

    - `qwen2`: an instruct model as Qwen2.5-1.5B-Instruct ships: `vocab_size` 151,936 > `len(tokenizer)` 151,665,
      tied embeddings, a chat template and a pad token.
    - `llama`: a base model: untied LM head, `vocab_size == len(tokenizer)` (adding `<image>` must grow the
      embeddings), no pad token and no chat template (the processor adds ChatML and a pad token).

    With `tokenizer_path` (e.g. a `small_qwen_tokenizer`), that tokenizer is used instead and the vocabulary is sized
    to it.
    """
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path or qwen_tokenizer_path()))
    if arch == "llama":
        tokenizer.pad_token = None
        tokenizer.chat_template = None
    common = {
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": QWEN_VOCAB_SIZE if arch == "qwen2" and tokenizer_path is None else len(tokenizer),
        "max_position_embeddings": 2048,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **common))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **common))
    else:
        raise ValueError(f"Unknown tiny LLM arch {arch!r}; choose 'qwen2' or 'llama'.")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def build_tiny_pivot(
    path: str | os.PathLike,
    family: str = "siglip",
    arch: str = "qwen2",
    vision_feature_layer: int = -2,
    seed: int = 0,
    **model_kwargs,
) -> str:
    """Compose a tiny Pivot MLLM (tiny `family` tower + tiny `arch` LLM) and save model + processor to `path`.

    The sub-checkpoints are written to `<path>-parts/` first and composed with the public
    `from_vision_text_pretrained`, the path real users take.
    """
    from .modeling_pivot import PivotForConditionalGeneration
    from .processing_pivot import PivotProcessor

    path = Path(path)
    parts = path.with_name(path.name + "-parts")  # beside the checkpoint, so the checkpoint folder stays clean
    vision = build_tiny_vision(parts / f"vision-{family}", family=family, seed=seed)
    text = build_tiny_llm(parts / f"llm-{arch}", arch=arch, seed=seed)
    processor = PivotProcessor.from_vision_text_pretrained(vision, text)
    torch.manual_seed(seed)
    # The interface's spelling: the model reads the text folder's tokenizer itself and agrees with the processor.
    model = PivotForConditionalGeneration.from_vision_text_pretrained(
        vision, text, vision_feature_layer=vision_feature_layer, **model_kwargs
    )
    if model.config.image_token_id != processor.image_token_id:
        raise AssertionError(
            f"image token: model {model.config.image_token_id} vs processor {processor.image_token_id}"
        )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


__all__ = [
    "real_config_path",
    "real_shape_pivot_config",
    "VISION_FAMILIES",
    "build_tiny_vision",
    "build_tiny_llm",
    "build_tiny_pivot",
    "qwen_tokenizer_path",
    "QWEN_VOCAB_SIZE",
    "small_qwen_tokenizer",
]
