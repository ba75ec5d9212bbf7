"""Recipe arguments of `recipes/sft.py` and `recipes/dpo.py`: YAML keys = CLI flags = the fields below.

Three dataclasses are parsed together (TRL style):
- `PivotScriptArguments` (dataset and data options, mirroring `pivot_hf.data.load_pivot_dataset`),
- `PivotModelConfig` (TRL's `ModelConfig` + how the MLLM is built: a Pivot checkpoint or an encoder + LLM composition),
- `PivotSFTConfig` / `PivotDPOConfig` (TRL's configs + the tunable parts and their learning rates).

`parse_recipe_args` wraps `TrlParser` so that a misspelled recipe key fails before anything is loaded, with the
closest valid key named.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field

from transformers.utils import is_torch_cuda_available
from trl import DPOConfig, ModelConfig, ScriptArguments, SFTConfig, TrlParser

from .inherited_keys import check_keys


TUNABLE_PARTS = ("vision_tower", "projector", "language_model")
_RENAMED_TRAINING_ARGS = (
    ("gradient_checkpointing", "activation_checkpointing"),
    ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
)


class RecipeConfigError(ValueError):
    """A recipe (YAML or CLI) that cannot run; raised before any model or data is loaded."""


# --------------------------------------------------------------------------------------------------------- data
@dataclass
class PivotScriptArguments(ScriptArguments):
    """Dataset options. `dataset_name` is an MMPR folder, a LLaVA JSON/JSONL/parquet/mixture YAML, a dataset saved by
    `datasets` (or by `pivot-hf data`), or a Hub id with TRL columns.

    Parameters:
        num_samples (`int | None`, *optional*, defaults to `None`):
            Rows to keep. None: MMPR keeps the recipe's 20,000-row subset, other sources keep everything; <= 0: keep
            all rows.
        dataset_seed (`int`, *optional*, defaults to `777`):
            Sampling seed of the data subset (777 in the authors' scripts); `seed` is the training one.
        template (`str`, *optional*, defaults to `'chat'`):
            LLaVA rows: `chat` (conversation) or `plain` (image + caption, Stage-1a projector pretraining).
        image_folder (`str | None`, *optional*, defaults to `None`):
            Image root of LLaVA data / MMPR-style JSONL (default: the data file's folder).
        variant (`str`, *optional*, defaults to `'none'`):
            Paper data variants (Table F): `under30` (chosen < 30 words), `nothink` (no <think>/<review>, chosen < 60
            words), `none`.
        new_distribution_ratio (`float | None`, *optional*, defaults to `None`):
            Fig. B: percentage (0-100) of rows with > 100 words or special tokens (None: the natural mix).
        max_text_tokens (`int | None`, *optional*, defaults to `1500`):
            Drop MMPR rows whose prompt + chosen exceed this many text tokens (authors: 1500).
        sft_loss_on (`str`, *optional*, defaults to `'assistant_turns'`):
            SFT rows given as `messages`: `assistant_turns` puts the loss on every assistant turn (content + end-of-
            turn token) and nothing else, whatever the LLM's chat template (the official recipe: loss on assistant
            tokens; multi-turn LLaVA/OneVision rows train every answer); `last_assistant_turn` turns each row into
            prompt + last answer (TRL's prompt/completion path); `all_tokens` keeps TRL's full-sequence loss.
        eval_num_samples (`int`, *optional*, defaults to `0`):
            Hold out this many training rows (after sampling) as an eval set; 0: no evaluation.
    """

    num_samples: int | None = field(
        default=None,
        metadata={
            "help": "Rows to keep. None: MMPR keeps the recipe's 20,000-row subset, other sources keep everything; "
            "<= 0: keep all rows."
        },
    )
    dataset_seed: int = field(
        default=777,
        metadata={
            "help": "Sampling seed of the data subset (777 in the authors' scripts); `seed` is the training one."
        },
    )
    template: str = field(
        default="chat",
        metadata={
            "help": "LLaVA rows: `chat` (conversation) or `plain` (image + caption, Stage-1a projector pretraining).",
            "choices": ["chat", "plain"],
        },
    )
    image_folder: str | None = field(
        default=None,
        metadata={"help": "Image root of LLaVA data / MMPR-style JSONL (default: the data file's folder)."},
    )
    variant: str = field(
        default="none",
        metadata={
            "help": "Paper data variants (Table F): `under30` (chosen < 30 words), `nothink` (no <think>/<review>, "
            "chosen < 60 words), `none`.",
            "choices": ["none", "under30", "nothink"],
        },
    )
    new_distribution_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Fig. B: percentage (0-100) of rows with > 100 words or special tokens (None: the natural mix)."
        },
    )
    max_text_tokens: int | None = field(
        default=1500,
        metadata={"help": "Drop MMPR rows whose prompt + chosen exceed this many text tokens (authors: 1500)."},
    )
    sft_loss_on: str = field(
        default="assistant_turns",
        metadata={
            "help": "SFT rows given as `messages`: `assistant_turns` puts the loss on every assistant turn (content + "
            "end-of-turn token) and nothing else, whatever the LLM's chat template (the official recipe: loss on "
            "assistant tokens; multi-turn LLaVA/OneVision rows train every answer); `last_assistant_turn` turns each "
            "row into prompt + last answer (TRL's prompt/completion path); `all_tokens` keeps TRL's full-sequence "
            "loss.",
            "choices": ["assistant_turns", "last_assistant_turn", "all_tokens"],
        },
    )
    eval_num_samples: int = field(
        default=0,
        metadata={"help": "Hold out this many training rows (after sampling) as an eval set; 0: no evaluation."},
    )

    def __post_init__(self):
        check_keys(self)
        parent_post_init = getattr(super(), "__post_init__", None)
        if parent_post_init is not None:
            parent_post_init()


# -------------------------------------------------------------------------------------------------------- model
@dataclass
class PivotModelConfig(ModelConfig):
    """How the Pivot MLLM is built: continue from `model_name_or_path` (a Pivot checkpoint), or compose a new one from
    `vision_model_name_or_path` + `text_model_name_or_path` (the projector is then freshly initialised).

    Parameters:
        vision_model_name_or_path (`str | None`, *optional*, defaults to `None`):
            Vision encoder (Hub id or folder; a dual encoder such as google/siglip2-so400m-patch16-384 gives its vision
            half) to compose a new MLLM with `text_model_name_or_path`.
        text_model_name_or_path (`str | None`, *optional*, defaults to `None`):
            Causal LLM (Hub id or folder) to compose a new MLLM with the vision encoder.
        vision_feature_layer (`int | None`, *optional*, defaults to `None`):
            Encoder layer whose patch tokens feed the projector. None: -2 (the penultimate layer, as in the paper) when
            composing, the checkpoint's own value when continuing from `model_name_or_path`.
        projector_type (`str`, *optional*, defaults to `'mlp2x_gelu'`):
            Projector of a newly composed MLLM.
        ref_model_name_or_path (`str | None`, *optional*, defaults to `None`):
            DPO reference model (a Pivot checkpoint). None: a frozen copy of the starting checkpoint, loaded separately
            (the paper's setting). Must have the policy's architecture.
        projector_init_from (`str | None`, *optional*, defaults to `None`):
            Stage 3: a Pivot checkpoint (or projector file) whose projector layers initialise this model's projector
            (Table I reuses the first layer of the PIVOT-trained projector).
        projector_reuse_layers (`int`, *optional*, defaults to `2`):
            Linear layers of the projector taken from `projector_init_from` (1: the first, '1+1' of Table I; 2: both).
        freeze_reused_projector (`bool`, *optional*, defaults to `False`):
            Keep the reused projector layers frozen (Table I's best: True with 1 layer).
        use_kernels (`bool`, *optional*, defaults to `False`):
            Hub kernels (transformers' `use_kernels`): replace layers such as RMSNorm, rotary embeddings and
            activations with kernels downloaded from the Hub (`kernels` package; CUDA). Off by default in every model
            pivot-hf loads, although transformers 5.25+ turns them on by default: they change the numbers the exactness
            tests and the reference log-prob cache rely on, overlap with `use_liger_kernel`, and fall back silently
            offline. Turn on for speed on GPUs with Hub access.
        lora_target_parts (`list[str]`, *optional*, defaults to `['language_model']`):
            With `use_peft`: the parts whose linear layers (selected by `lora_target_modules`, default all-linear) get
            LoRA adapters; any of vision_tower, projector, language_model. The other parts of `tunable_parts` train in
            full at their own LR (vision_tower_lr, projector_lr), as ms-swift's `--freeze_vit false`.
    """

    vision_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Vision encoder (Hub id or folder; a dual encoder such as google/siglip2-so400m-patch16-384 gives "
            "its vision half) to compose a new MLLM with `text_model_name_or_path`."
        },
    )
    text_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Causal LLM (Hub id or folder) to compose a new MLLM with the vision encoder."}
    )
    vision_feature_layer: int | None = field(
        default=None,
        metadata={
            "help": "Encoder layer whose patch tokens feed the projector. None: -2 (the penultimate layer, as in the "
            "paper) when composing, the checkpoint's own value when continuing from `model_name_or_path`."
        },
    )
    projector_type: str = field(
        default="mlp2x_gelu",
        metadata={"help": "Projector of a newly composed MLLM.", "choices": ["mlp2x_gelu", "linear"]},
    )
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "DPO reference model (a Pivot checkpoint). None: a frozen copy of the starting checkpoint, "
            "loaded separately (the paper's setting). Must have the policy's architecture."
        },
    )
    projector_init_from: str | None = field(
        default=None,
        metadata={
            "help": "Stage 3: a Pivot checkpoint (or projector file) whose projector layers initialise this model's "
            "projector (Table I reuses the first layer of the PIVOT-trained projector)."
        },
    )
    projector_reuse_layers: int = field(
        default=2,
        metadata={
            "help": "Linear layers of the projector taken from `projector_init_from` (1: the first, '1+1' of Table "
            "I; 2: both).",
            "choices": [0, 1, 2],
        },
    )
    freeze_reused_projector: bool = field(
        default=False,
        metadata={"help": "Keep the reused projector layers frozen (Table I's best: True with 1 layer)."},
    )
    use_kernels: bool = field(
        default=False,
        metadata={
            "help": "Hub kernels (transformers' `use_kernels`): replace layers such as RMSNorm, rotary embeddings and "
            "activations with kernels downloaded from the Hub (`kernels` package; CUDA). Off by default in every "
            "model pivot-hf loads, although transformers 5.25+ turns them on by default: they change the numbers the "
            "exactness tests and the reference log-prob cache rely on, overlap with `use_liger_kernel`, and fall back "
            "silently offline. Turn on for speed on GPUs with Hub access."
        },
    )
    lora_target_parts: list[str] = field(
        default_factory=lambda: ["language_model"],
        metadata={
            "help": "With `use_peft`: the parts whose linear layers (selected by `lora_target_modules`, default "
            "all-linear) get LoRA adapters; any of vision_tower, projector, language_model. The other parts of "
            "`tunable_parts` train in full at their own LR (vision_tower_lr, projector_lr), as ms-swift's "
            "`--freeze_vit false`."
        },
    )

    def __post_init__(self):
        check_keys(self)
        super().__post_init__()
        self.lora_target_parts = _normalize_parts(self.lora_target_parts)
        unknown = [p for p in self.lora_target_parts if p not in TUNABLE_PARTS]
        if unknown or not self.lora_target_parts:
            raise RecipeConfigError(
                f"lora_target_parts={self.lora_target_parts} must list one or more of {list(TUNABLE_PARTS)}."
            )
        check_quantization(self)
        if self.use_peft and not self.model_name_or_path:
            raise RecipeConfigError(
                "`use_peft: true` needs `model_name_or_path` (a Pivot checkpoint): the adapter it saves is loaded onto "
                "that base checkpoint, and a newly composed MLLM has none. Fix: save the composed model first (e.g. "
                "the Stage-1 output) and continue from it with `use_peft`."
            )
        has_ckpt = bool(self.model_name_or_path)
        has_pair = bool(self.vision_model_name_or_path) or bool(self.text_model_name_or_path)
        if has_ckpt and has_pair:
            raise RecipeConfigError(
                "Both `model_name_or_path` and `vision_model_name_or_path`/`text_model_name_or_path` are set. Fix: set "
                "`model_name_or_path` to continue from a Pivot checkpoint, or the two others to compose a new MLLM."
            )
        if has_pair and not (self.vision_model_name_or_path and self.text_model_name_or_path):
            raise RecipeConfigError(
                "Composing a new MLLM needs both `vision_model_name_or_path` and `text_model_name_or_path`."
            )
        if self.projector_init_from and self.projector_reuse_layers == 0:
            raise RecipeConfigError(
                "`projector_init_from` is set but `projector_reuse_layers` is 0: set it to 1 or 2, or drop "
                "`projector_init_from`."
            )


_BNB_4BIT_DEFAULTS = {
    f.name: f.default
    for f in dataclasses.fields(ModelConfig)
    if f.name in ("bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage")
}


def check_quantization(model_args) -> None:
    """`load_in_4bit` / `load_in_8bit` (bitsandbytes) are honoured on CUDA with `use_peft` (QLoRA); anything else is
    refused here, when the recipe is parsed: before a weight is loaded."""
    bnb_4bit = [k for k, default in _BNB_4BIT_DEFAULTS.items() if getattr(model_args, k) != default]
    if bnb_4bit and not model_args.load_in_4bit:
        raise RecipeConfigError(
            f"{bnb_4bit} only apply with `load_in_4bit: true`, which is not set. Fix: remove them, or set "
            "`load_in_4bit: true` (QLoRA, CUDA only)."
        )
    keys = [k for k in ("load_in_4bit", "load_in_8bit") if getattr(model_args, k, False)]
    if not keys:
        return
    if len(keys) > 1:
        raise RecipeConfigError("`load_in_4bit` and `load_in_8bit` are both set. Fix: choose one.")
    key = keys[0]
    if not is_torch_cuda_available():
        raise RecipeConfigError(
            f"`{key}: true` quantizes the model with bitsandbytes, which needs a CUDA GPU, and none is visible on this "
            f"machine. Fix: set `{key}: false` (`--{key} false`) on CPU; use `use_peft: true` alone for LoRA."
        )
    if not model_args.use_peft:
        raise RecipeConfigError(
            f"`{key}: true` without `use_peft: true`: quantized weights cannot be trained in full. Fix: set "
            "`use_peft: true` (QLoRA), or drop the quantization."
        )
    if not model_args.model_name_or_path:
        raise RecipeConfigError(
            f"`{key}: true` needs `model_name_or_path` (a Pivot checkpoint to load quantized); a newly composed MLLM "
            "is built in full precision. Fix: save the composed model (Stage 1) and continue from it."
        )


# ----------------------------------------------------------------------------------------------------- training
def part_learning_rates(args) -> dict[str, float]:
    """The learning rate of each tunable part: its own key when set, else `learning_rate`."""
    return {
        "vision_tower": args.learning_rate if args.vision_tower_lr is None else args.vision_tower_lr,
        "projector": args.learning_rate if args.projector_lr is None else args.projector_lr,
        "language_model": args.learning_rate,
    }


def check_part_lrs(args) -> None:
    """Refuse a tunable part whose learning rate is 0 (or negative) before any compute: it would train nothing, and the
    end-of-run check would only find out after the whole schedule."""
    lrs = part_learning_rates(args)
    part_keys = {"vision_tower": "vision_tower_lr", "projector": "projector_lr"}
    problems = []
    for part in getattr(args, "tunable_parts", None) or []:
        lr = lrs.get(part)
        if lr is not None and lr <= 0:
            key = part_keys.get(part, "learning_rate")
            # The part's own key when it is set, else the shared `learning_rate` it falls back to.
            source = key if key == "learning_rate" or getattr(args, key) is not None else "learning_rate"
            problems.append(f"{part!r} has learning rate {lr:g} (from `{source}`)")
    if problems:
        raise RecipeConfigError(
            f"Tunable part(s) cannot train: {'; '.join(problems)}. Fix: set each named key to a positive value (the "
            "paper's Stage 2 uses 1e-6 for every part, Stage 1b 2e-6 for the vision tower), or remove the part from "
            f"`tunable_parts` (now {list(args.tunable_parts)}) to freeze it."
        )


def _normalize_parts(parts) -> list[str]:
    if parts is None:
        return []
    if isinstance(parts, str):
        parts = [parts]
    out = []
    for item in parts:  # `--tunable_parts projector,language_model` works as well as a YAML list
        out.extend(p.strip() for p in str(item).split(",") if p.strip())
    return out


@dataclass
class PivotTrainingFields:
    """Fields shared by `PivotSFTConfig` and `PivotDPOConfig` (kept on the training config because they shape the
    optimizer, and so travel with `training_args.json` into checkpoints and resumes).

    Parameters:
        tunable_parts (`list[str]`, *optional*, defaults to `['vision_tower', 'projector', 'language_model']`):
            Parts that train: any of vision_tower, projector, language_model (`lm_head` belongs to language_model).
            Vision-tower weights no gradient can reach from the feature layer stay frozen.
        vision_tower_lr (`float | None`, *optional*, defaults to `None`):
            Learning rate of the vision tower (None: `learning_rate`).
        projector_lr (`float | None`, *optional*, defaults to `None`):
            Learning rate of the projector (None: `learning_rate`).
        check_tunable_parts_changed (`bool`, *optional*, defaults to `True`):
            At the end of training, check that every tunable part changed; a vision tower meant to train that did not
            change is an error (the most common silent failure of MLLM encoder training).
        max_image_pixels (`int`, *optional*, defaults to `89478485`):
            Row contract: an image with more pixels (width x height) than this is skipped and counted as
            `image_too_large` before any compute, from its header (decompression-bomb guard; PIL's own default).
        update_norm_memory_mib (`float`, *optional*, defaults to `512`):
            Memory budget (MiB, per process) of the per-part update-norm monitor's copy of the trainable weights on
            logged steps. A copy that fits is taken whole (exact norms); a larger one is replaced by every k-th
            64k-element piece (k = copy size / budget), rotating with the step, so the logged update/weight ratio is
            estimated on that sample. -1: no budget (always exact).
    """

    tunable_parts: list[str] = field(
        default_factory=lambda: list(TUNABLE_PARTS),
        metadata={
            "help": "Parts that train: any of vision_tower, projector, language_model (`lm_head` belongs to "
            "language_model). Vision-tower weights no gradient can reach from the feature layer stay frozen."
        },
    )
    vision_tower_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the vision tower (None: `learning_rate`)."}
    )
    projector_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the projector (None: `learning_rate`)."}
    )
    check_tunable_parts_changed: bool = field(
        default=True,
        metadata={
            "help": "At the end of training, check that every tunable part changed; a vision tower meant to train "
            "that did not change is an error (the most common silent failure of MLLM encoder training)."
        },
    )
    max_image_pixels: int = field(
        default=89_478_485,
        metadata={
            "help": "Row contract: an image with more pixels (width x height) than this is skipped and counted as "
            "`image_too_large` before any compute, from its header (decompression-bomb guard; PIL's own default)."
        },
    )
    update_norm_memory_mib: float = field(
        default=512,
        metadata={
            "help": "Memory budget (MiB, per process) of the per-part update-norm monitor's copy of the trainable "
            "weights on logged steps. A copy that fits is taken whole (exact norms); a larger one is replaced by "
            "every k-th 64k-element piece (k = copy size / budget), rotating with the step, so the logged "
            "update/weight ratio is estimated on that sample. -1: no budget (always exact)."
        },
    )

    def _pivot_post_init(self):
        check_keys(self)

        if (
            self.update_norm_memory_mib is not None
            and self.update_norm_memory_mib != -1
            and self.update_norm_memory_mib < 1
        ):
            raise RecipeConfigError(
                f"`update_norm_memory_mib` must be >= 1 (MiB) or -1 (no budget), got {self.update_norm_memory_mib}."
            )
        self.tunable_parts = _normalize_parts(self.tunable_parts)
        unknown = [p for p in self.tunable_parts if p not in TUNABLE_PARTS]
        if unknown:
            raise RecipeConfigError(
                f"Unknown tunable_parts {unknown}. Fix: choose from {list(TUNABLE_PARTS)}, e.g. "
                "`tunable_parts: [vision_tower, projector, language_model]`."
            )
        if self.max_image_pixels < 1:
            raise RecipeConfigError(f"`max_image_pixels` must be >= 1, got {self.max_image_pixels}.")
        if not self.tunable_parts:
            raise RecipeConfigError(
                "`tunable_parts` is empty: nothing would train. Fix: list at least one of "
                f"{list(TUNABLE_PARTS)} (PIVOT trains all three)."
            )
        for name in ("vision_tower_lr", "projector_lr"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise RecipeConfigError(f"`{name}` must be >= 0, got {value}.")
        # transformers 5.23 renamed `gradient_checkpointing(_kwargs)` -> `activation_checkpointing(_kwargs)` and warns
        # on the old names. Recipes keep the old key, valid across the tested range; it is handed to the new field
        # where that exists, so no deprecated argument reaches transformers.
        for old, new in _RENAMED_TRAINING_ARGS:
            if hasattr(self, new) and getattr(self, new) is None and getattr(self, old, None) is not None:
                setattr(self, new, getattr(self, old))
                setattr(self, old, None)

        check_part_lrs(self)  # a tunable part at LR 0 is refused at parse time, before compute
        cuda = is_torch_cuda_available()
        if self.bf16 is None and not cuda:
            # TRL defaults bf16 to True, which transformers refuses on a CPU-only machine; recipes that want bf16 say so.
            self.bf16 = False
        if getattr(self, "use_liger_kernel", False) and not cuda:
            raise RecipeConfigError(
                "`use_liger_kernel: true` needs a CUDA GPU (Liger's kernels are Triton), and none is visible on this "
                "machine. Fix: set `use_liger_kernel: false` (or pass `--use_liger_kernel false`) for CPU runs."
            )


@dataclass
class PivotSFTConfig(PivotTrainingFields, SFTConfig):
    """TRL's `SFTConfig` + tunable parts and per-part learning rates.

    Parameters:
        The fields of `PivotTrainingFields` (tunable parts, per-part learning rates, end-of-run check, update-norm
        budget), then every field of TRL's `SFTConfig`, honoured as TRL documents it.
    """

    def __post_init__(self):
        self._pivot_post_init()
        super().__post_init__()


@dataclass
class FastDPOArguments:
    """Fields of the fast path. `PivotDPOConfig` inherits them (`class PivotDPOConfig(FastDPOArguments, DPOConfig)`);
    the mixin reads them with `getattr` defaults, so a plain `DPOConfig` works too.

    `precompute_ref_log_probs` itself is TRL's `DPOConfig` field: with the mixin it also works for vision datasets.

    Parameters:
        share_image_features (`bool`, *optional*, defaults to `True`):
            Encode each image once per preference pair (policy and reference).
        share_prompt_prefix (`bool`, *optional*, defaults to `True`):
            Run the image + prompt prefix once per pair (packed sequence with a block mask).
        compact_lm_head (`bool`, *optional*, defaults to `True`):
            Project only completion positions through the LM head on every device (TRL: CUDA only).
        ref_logps_cache_dir (`str | None`, *optional*, defaults to `None`):
            Where cached reference log-probs live (default: <output_dir>/ref_logps).
        padding_free (`bool`, *optional*, defaults to `True`):
            Pack the pairs of a micro-batch back to back (no padding), each [prefix | chosen | rejected] pair attending
            to its own blocks only. sdpa: one row, attention computed pair by pair; eager: rows of at most
            padding_free_row_tokens under a dense block mask; flash attention: sequences delimited by position ids (no
            prefix sharing).
        padding_free_row_tokens (`int | None`, *optional*, defaults to `None`):
            Longest packed row with padding_free under eager attention, whose dense block mask is quadratic in the row
            (tokens). Default: the longest pair of the micro-batch, so attention cost grows with the batch linearly. A
            pair longer than this gets a row alone. sdpa attends pair by pair and ignores it.
    """

    share_image_features: bool = field(
        default=True, metadata={"help": "Encode each image once per preference pair (policy and reference)."}
    )
    share_prompt_prefix: bool = field(
        default=True,
        metadata={"help": "Run the image + prompt prefix once per pair (packed sequence with a block mask)."},
    )
    compact_lm_head: bool = field(
        default=True,
        metadata={"help": "Project only completion positions through the LM head on every device (TRL: CUDA only)."},
    )
    ref_logps_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where cached reference log-probs live (default: <output_dir>/ref_logps)."},
    )
    # TRL's own `DPOConfig.padding_free` (disabled in TRL's DPO since its refactor), implemented by the pair forward.
    padding_free: bool = field(
        default=True,
        metadata={
            "help": "Pack the pairs of a micro-batch back to back (no padding), each [prefix | chosen | rejected] pair "
            "attending to its own blocks only. sdpa: one row, attention computed pair by pair; eager: rows of at "
            "most padding_free_row_tokens under a dense block mask; flash attention: sequences delimited by position "
            "ids (no prefix sharing)."
        },
    )
    padding_free_row_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Longest packed row with padding_free under eager attention, whose dense block mask is quadratic "
            "in the row (tokens). Default: the longest pair of the micro-batch, so attention cost grows with the "
            "batch linearly. A pair longer than this gets a row alone. sdpa attends pair by pair and ignores it."
        },
    )


@dataclass
class PivotDPOConfig(FastDPOArguments, PivotTrainingFields, DPOConfig):
    """TRL's `DPOConfig` + tunable parts, per-part learning rates and the fast path's switches (shared image features,
    shared prompt prefix, cached reference log-probs for vision data). `loss_type` / `loss_weights` pass through
    (sigmoid = PIVOT; `[sigmoid, bco_pair, sft]` with `[0.8, 0.2, 1.0]` = MPO).

    Parameters:
        The fields of `FastDPOArguments` (the fast path) and `PivotTrainingFields` (tunable parts, per-part learning
        rates, end-of-run check, update-norm budget), then every field of TRL's `DPOConfig`. TRL's `padding_free`
        (default here: True) is implemented by the fast path, and `precompute_ref_log_probs` works for vision data.
    """

    def __post_init__(self):
        self._pivot_post_init()
        super().__post_init__()


# ------------------------------------------------------------------------------------------------------ parsing
def recipe_keys(dataclass_types) -> set[str]:
    parser = TrlParser(list(dataclass_types))
    return {action.dest for action in parser._actions if action.dest != "help"}


def parse_recipe_args(dataclass_types, argv=None):
    """Parse `--config recipe.yaml` + CLI overrides into `dataclass_types`; unknown keys are a `RecipeConfigError`
    naming the closest valid keys (TRL only lists them as 'unknown arguments')."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    # No prefix matching: `--learning_rat` must be an error, not silently `--learning_rate`.
    parser = TrlParser(list(dataclass_types), allow_abbrev=False)
    known = recipe_keys(dataclass_types)
    config_path = argv[argv.index("--config") + 1] if "--config" in argv[:-1] else None
    try:
        *parsed, from_config, from_cli = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except FileNotFoundError as err:
        raise RecipeConfigError(f"Recipe file not found: {err.filename}") from err
    unknown_config = from_config[0::2]
    unknown_cli = [s for s in from_cli if s.startswith("--")]
    if unknown_config or unknown_cli or [s for s in from_cli if not s.startswith("--")]:
        lines = []
        for key in [k.lstrip("-") for k in unknown_config + unknown_cli]:
            where = f"in {config_path}" if f"--{key}" in unknown_config else "on the command line"
            close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            lines.append(f"  - `{key}` ({where}).{hint}")
        stray = [s for s in from_cli if not s.startswith("--")]
        if stray and not unknown_cli:
            lines.append(f"  - stray values on the command line: {stray}")
        raise RecipeConfigError(
            "Unknown recipe keys:\n"
            + "\n".join(lines)
            + "\nFix: correct or remove them; valid keys are the fields of PivotScriptArguments, PivotModelConfig and "
            "the training config (`python recipes/<script>.py --help` lists them)."
        )
    return tuple(parsed)


def check_model_source(model_args: PivotModelConfig) -> None:
    if not model_args.model_name_or_path and not model_args.vision_model_name_or_path:
        raise RecipeConfigError(
            "No model given. Fix: set `model_name_or_path` (a Pivot checkpoint to continue from) or "
            "`vision_model_name_or_path` + `text_model_name_or_path` (compose a new MLLM)."
        )
    for key in ("model_name_or_path", "vision_model_name_or_path", "text_model_name_or_path", "projector_init_from"):
        value = getattr(model_args, key)
        if value and "<" in value and ">" in value:
            raise RecipeConfigError(
                f"`{key}: {value}` is a placeholder. Fix: pass the real path, e.g. `--{key} /path/to/checkpoint`."
            )
        # Hub ids are `name` or `owner/name`; anything else (absolute, ./, or a deeper relative path) is a folder.
        looks_local = value and (value.startswith(("/", "./", "../", "~")) or value.count("/") > 1)
        if looks_local and not os.path.exists(os.path.expanduser(value)):
            raise RecipeConfigError(
                f"`{key}: {value}` does not exist. Fix: point it at an existing folder (e.g. the output_dir of the "
                "previous stage), or pass a Hub id."
            )


__all__ = [
    "TUNABLE_PARTS",
    "PivotDPOConfig",
    "PivotModelConfig",
    "PivotSFTConfig",
    "PivotScriptArguments",
    "PivotTrainingFields",
    "RecipeConfigError",
    "check_model_source",
    "check_part_lrs",
    "parse_recipe_args",
    "part_learning_rates",
    "recipe_keys",
]
