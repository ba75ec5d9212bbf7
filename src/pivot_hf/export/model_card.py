"""Model card of an exported PIVOT encoder, and the run metadata it is built from.

The card is made with huggingface_hub's `ModelCard` / `ModelCardData` (Hub metadata: `base_model`, `datasets`, tags,
`library_name: transformers`, `pipeline_tag: image-feature-extraction`) and documents the feature layer, the recipe
and hyperparameters (from the run's JSON files, never the pickled `training_args.bin`), the vision evaluations found
(`results.json`) and a usage snippet with `AutoModel`. Credential-like keys never reach it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id


# Subfolder of an export holding the projector layers (written and read by pivot_hf.export).
PROJECTOR_SUBFOLDER = "projector"

# Config attributes an export adds to the vision config (plain JSON keys: transformers keeps unknown config keys).
FEATURE_LAYER_KEY = "pivot_vision_feature_layer"
PREFIX_TOKENS_KEY = "pivot_vision_num_prefix_tokens"
BASE_MODEL_KEY = "pivot_base_vision_model"
TRUNCATED_KEY = "pivot_truncated_to_feature_layer"

# Training-argument keys shown in the model card, in this order (the rest stays in the run's own files).
CARD_HYPERPARAMETERS = (
    "loss_type",
    "loss_weights",
    "beta",
    "learning_rate",
    "vision_tower_lr",
    "projector_lr",
    "tunable_parts",
    "vision_feature_layer",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "lr_scheduler_type",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "optim",
    "max_length",
    "bf16",
    "fp16",
    "gradient_checkpointing",
    "seed",
    "dataset_name",
)
# JSON files a run directory may hold its training arguments in (never the pickled `training_args.bin`).
TRAINING_ARGS_FILES = ("training_args.json", "train_args.json", "args.json", "recipe.json")
# Keys that may hold credentials; they are dropped from everything the card shows, whatever their value.
_SECRET_KEY = re.compile(r"token|secret|password|api_key|apikey|credential", re.IGNORECASE)


def is_hub_id(name: str | None) -> bool:
    """True for a Hub repo id (`org/name`), False for local paths, which mean nothing on a public card."""
    if not name or os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------------------------
# Run metadata for the card
# ----------------------------------------------------------------------------------------------------------------------
def _scrub(obj: Any) -> Any:
    """Drop credential-like keys at any depth (e.g. `hub_token` in a run's training arguments)."""
    if isinstance(obj, dict):
        return {k: _scrub(v) for k, v in obj.items() if not _SECRET_KEY.search(str(k))}
    if isinstance(obj, list | tuple):
        return [_scrub(v) for v in obj]
    return obj


def read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_run_metadata(run_dir: str | None) -> dict:
    """Hyperparameters and progress of a training run from its JSON files (never the pickled training_args.bin).

    Returns `{"hyperparameters": {...}, "state": {...}, "sources": [...]}`; empty parts when nothing is found.
    """
    meta = {"hyperparameters": {}, "state": {}, "sources": [], "hub_datasets": [], "run": {}}
    if not run_dir or not os.path.isdir(run_dir):
        return meta
    run = Path(run_dir)
    for name in TRAINING_ARGS_FILES:
        data = read_json(run / name)
        if isinstance(data, dict):
            meta["hyperparameters"] = {k: data[k] for k in CARD_HYPERPARAMETERS if data.get(k) is not None}
            meta["sources"].append(name)
            break
    summary = read_json(run / "pivot_run.json")  # written by pivot_hf's recipes: data and parts of the run
    if isinstance(summary, dict):
        meta["sources"].append("pivot_run.json")
        meta["run"] = {
            key: summary[key]
            for key in ("method", "loss_type", "tunable_parts", "global_step", "tensors_changed", "peft")
            if summary.get(key) is not None
        }
        for key in ("dataset_name", "tunable_parts"):
            if summary.get(key) is not None and key not in meta["hyperparameters"]:
                meta["hyperparameters"][key] = summary[key]
        if summary.get("learning_rates"):
            meta["hyperparameters"]["learning_rates"] = summary["learning_rates"]
    dataset = meta["hyperparameters"].get("dataset_name")
    if is_hub_id(dataset):
        meta["hub_datasets"] = [dataset]  # for the card's `datasets` metadata
    elif isinstance(dataset, str):
        # A local path says nothing to readers of a public card and may reveal the machine's layout.
        meta["hyperparameters"]["dataset_name"] = os.path.basename(dataset.rstrip("/")) or dataset
    state = read_json(run / "trainer_state.json")
    if isinstance(state, dict):
        meta["sources"].append("trainer_state.json")
        for key in ("global_step", "epoch", "max_steps", "num_train_epochs", "train_batch_size"):
            if state.get(key) is not None and key not in meta["hyperparameters"]:
                meta["state"][key] = state[key]
        losses = [h["loss"] for h in state.get("log_history", []) if isinstance(h, dict) and "loss" in h]
        if losses:
            meta["state"]["final_train_loss"] = losses[-1]
    return _scrub(meta)


def find_eval_results(*folders: str | None, max_depth: int = 3) -> list[dict]:
    """Rows `{task, model, metric, value, primary, source}` from vision-evaluation `results.json` files."""
    rows, seen = [], set()
    for folder in folders:
        if not folder or not os.path.isdir(folder):
            continue
        root_depth = folder.rstrip(os.sep).count(os.sep)
        for dirpath, dirnames, filenames in os.walk(folder):
            if dirpath.count(os.sep) - root_depth >= max_depth:
                dirnames[:] = []
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if "results.json" not in filenames:
                continue
            path = os.path.realpath(os.path.join(dirpath, "results.json"))
            if path in seen:
                continue
            seen.add(path)
            doc = read_json(Path(path))
            if not isinstance(doc, dict) or not isinstance(doc.get("runs"), list):
                continue
            for run in doc["runs"]:
                for metric, value in (run.get("metrics") or {}).items():
                    if isinstance(value, int | float) and not isinstance(value, bool):
                        rows.append(
                            {
                                "task": doc.get("task", "?"),
                                "model": run.get("label", "?"),
                                "metric": metric,
                                "value": value,
                                "primary": metric == doc.get("primary_metric"),
                                "source": os.path.relpath(path, folder),
                            }
                        )
    return _scrub(rows)


# ----------------------------------------------------------------------------------------------------------------------
# Model card
# ----------------------------------------------------------------------------------------------------------------------
_CARD_TEMPLATE = """---
{{ card_data }}
---

{{ body }}
"""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return f"`{json.dumps(value)}`" if isinstance(value, list | dict) else str(value)


_METHODS = {
    "dpo": "post-trained with **PIVOT** (Preference-Instructed Vision OpTimization): the encoder inside a LLaVA-style "
    "MLLM (encoder -> 2-layer MLP projector -> LLM) trained with DPO on preference pairs while its gradients flow",
    "sft": "trained by **supervised fine-tuning** (next-token loss on answers) inside a LLaVA-style MLLM (encoder -> "
    "2-layer MLP projector -> LLM): the SFT control / Stage-1 training of the PIVOT recipe, not its preference (DPO) "
    "stage",
    "grpo": "post-trained with **GRPO** (rule-based rewards) inside a LLaVA-style MLLM (encoder -> 2-layer MLP "
    "projector -> LLM) while its gradients flow",
}


def run_method(run_metadata: dict) -> str:
    """`dpo`, `sft`, `grpo`, `untrained` (the encoder did not train in the run) or `unknown` (no run metadata)."""
    run = run_metadata.get("run") or {}
    hyper = run_metadata.get("hyperparameters") or {}
    parts = run.get("tunable_parts", hyper.get("tunable_parts"))
    changed = (run.get("tensors_changed") or {}).get("vision_tower")
    if (isinstance(parts, list) and "vision_tower" not in parts) or run.get("global_step") == 0:
        return "untrained"
    if isinstance(changed, list) and changed and changed[0] == 0:
        return "untrained"
    method = run.get("method")
    loss = run.get("loss_type", hyper.get("loss_type"))
    if method == "dpo" and loss and set(loss if isinstance(loss, list) else [loss]) == {"sft"}:
        return (
            "sft"  # TRL's DPO trainer with only its `sft` loss: next-token loss on the chosen answers, no preference
        )
    if method in _METHODS:
        return method
    loss = hyper.get("loss_type")
    grpo_losses = {"grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo"}
    if ("beta" in hyper or loss is not None) and not (set(loss if isinstance(loss, list) else [loss]) & grpo_losses):
        return "dpo"  # training arguments only (no pivot_run.json): DPO's beta / loss_type
    return "unknown"


def describe_peft(run_metadata: dict) -> str:
    """A sentence on the run's LoRA adapters (rank, alpha, DoRA/rsLoRA, adapted parts), or '' for a full run."""
    peft = (run_metadata.get("run") or {}).get("peft")
    if not isinstance(peft, dict):
        return ""
    kind = "DoRA" if peft.get("use_dora") else "LoRA"
    scaling = ", rsLoRA scaling" if peft.get("use_rslora") else ""
    parts = peft.get("adapted_parts") or ["some layers"]
    names = {"vision_tower": "the vision encoder", "projector": "the projector", "language_model": "the LLM"}
    adapted = " and ".join(names.get(p, p) for p in parts)
    text = (
        f" The run used {kind} adapters of rank {peft.get('r')} (alpha {peft.get('lora_alpha')}{scaling}) on {adapted}"
    )
    if "vision_tower" in parts:
        text += "; the encoder's adapters are merged into the weights published here"
    elif "vision_tower" in (peft.get("modules_to_save") or []):
        text += "; the encoder itself trained in full"
    return text + "."


def describe_run(encoder_config, run_metadata: dict) -> str:
    """The card's first sentence: what the run recorded next to the checkpoint did to this encoder."""
    method = run_method(run_metadata)
    name = f"A `{type_name(encoder_config)}` vision encoder"
    tail = " Only the encoder is published here; it loads with plain `transformers` (no `trust_remote_code`)."
    if method in _METHODS:
        loss = (run_metadata.get("run") or {}).get("loss_type")
        extra = (
            f" (`loss_type: {_fmt(loss)}`)" if method == "dpo" and loss not in (None, "sigmoid", ["sigmoid"]) else ""
        )
        return f"{name} {_METHODS[method]}{extra}.{describe_peft(run_metadata)}{tail}"
    if method == "untrained":
        return (
            f"{name} exported from a LLaVA-style MLLM whose training run did not train the encoder (its weights are "
            f"the base encoder's; e.g. a Stage-1 projector run).{tail}"
        )
    return (
        f"{name} exported from a LLaVA-style MLLM by pivot-hf. How it was trained is unknown: no run metadata "
        f"(`pivot_run.json`, training arguments) was found next to the checkpoint.{tail}"
    )


def build_model_card(
    encoder_config,
    *,
    repo_id: str,
    model_name: str | None = None,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
    license: str | None = None,
    run_metadata: dict | None = None,
    eval_results: list[dict] | None = None,
    projector_meta: dict | None = None,
) -> ModelCard:
    """The model card of an exported encoder: Hub metadata + recipe, feature layer, evaluations and usage."""
    run_metadata = run_metadata or {"hyperparameters": {}, "state": {}, "sources": []}
    hyper = run_metadata.get("hyperparameters", {})
    family = encoder_config.model_type
    layer = getattr(encoder_config, FEATURE_LAYER_KEY)
    prefix = getattr(encoder_config, PREFIX_TOKENS_KEY)
    truncated = getattr(encoder_config, TRUNCATED_KEY, False)
    datasets = [d for d in (datasets or []) if is_hub_id(d)] + list(run_metadata.get("hub_datasets", []))
    datasets = list(dict.fromkeys(datasets))
    base = base_model if is_hub_id(base_model) else None
    method = run_method(run_metadata)
    method_tags = [method] if method in _METHODS else []
    all_tags = list(
        dict.fromkeys(["pivot", "vision", "image-feature-extraction", *method_tags, family, *(tags or [])])
    )
    data = ModelCardData(
        base_model=base,
        datasets=datasets or None,
        tags=all_tags,
        license=license,
        library_name="transformers",
        pipeline_tag="image-feature-extraction",
    )
    title = model_name or repo_id.split("/")[-1]
    naflex = family == "siglip2_vision_model"
    lines = [f"# {title}", ""]
    lines += [
        describe_run(encoder_config, run_metadata),
        "",
        f"- Base model: `{base}`" if base else "- Base model: not recorded (local encoder)",
        f"- Exported with pivot-hf from a `{family}` tower, "
        + ("truncated to the trained depth." if truncated else "same depth and config as the base (drop-in)."),
        "",
        "## Feature layer",
        "",
        f"The MLLM read the encoder at `hidden_states[{_fmt(layer)}]` (config `{FEATURE_LAYER_KEY}`), after dropping "
        f"the first {prefix} token(s) (config `{PREFIX_TOKENS_KEY}`), *before* any final norm or pooling head. "
        + (
            "The blocks above that layer were cut, so it is the output of the last block; the final norm and head "
            "kept by the transformers class were never trained."
            if truncated
            else "Blocks above it, the final norm and the head are the base model's, untouched by PIVOT."
        ),
        "",
        "## Usage",
        "",
        "```python",
        "import torch",
        "from PIL import Image",
        "from transformers import AutoImageProcessor, AutoModel",
        "",
        f'model = AutoModel.from_pretrained("{repo_id}").eval()',
        f'processor = AutoImageProcessor.from_pretrained("{repo_id}")',
        'inputs = processor(images=Image.open("image.jpg").convert("RGB"), return_tensors="pt")',
        *(
            [
                "# MAE shuffles patches with random noise even unmasked: ascending noise keeps them in order.",
                "noise = torch.arange(model.embeddings.patch_embeddings.num_patches, dtype=torch.float)[None]",
                "with torch.no_grad():",
                "    outputs = model(**inputs, noise=noise, output_hidden_states=True)",
            ]
            if family == "vit_mae"
            else ["with torch.no_grad():", "    outputs = model(**inputs, output_hidden_states=True)"]
        ),
        "layer = model.config.pivot_vision_feature_layer  # the layer PIVOT trained (a list: concatenated)",
        "prefix = model.config.pivot_vision_num_prefix_tokens  # CLS / register tokens, not patches",
        "layers = layer if isinstance(layer, list) else [layer]",
        "features = torch.cat([outputs.hidden_states[i][:, prefix:] for i in layers], dim=-1)",
    ]
    if naflex:
        lines.append('features = features[0][inputs["pixel_attention_mask"][0].bool()]  # NaFlex: valid patches only')
    lines += ["```", ""]
    lines += [
        "To build a new MLLM on it (the paper's Stage 3: frozen encoder, fresh LLM, projector pretraining then "
        "projector + LLM finetuning), pass this repo as `vision_model_name_or_path` to pivot-hf's "
        "`recipes/sft.py` with the `recipes/paper/stage3/` configs.",
        "",
    ]
    lines += ["## Training", ""]
    if hyper or run_metadata.get("state"):
        lines += ["| hyperparameter | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in hyper.items()]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in run_metadata.get("state", {}).items()]
        lines += ["", f"Read from the run's {', '.join(run_metadata.get('sources', []))}.", ""]
    else:
        lines += ["No training-run metadata was found next to the checkpoint.", ""]
    if method == "dpo":
        lines += [
            "Recipe (paper defaults): Stage 1 projector pretraining + full finetuning, then Stage 2 sigmoid DPO "
            "(beta 0.1, 3 epochs, lr 1e-6 for all parts including the vision tower) on 20K MMPR-v1.2 pairs.",
            "",
        ]
    if eval_results:
        lines += ["## Evaluation", "", "| task | model | metric | value |", "|---|---|---|---|"]
        for row in eval_results:
            metric = f"**{row['metric']}**" if row.get("primary") else row["metric"]
            lines.append(f"| {row['task']} | {row['model']} | {metric} | {_fmt(row['value'])} |")
        lines += ["", "Vision-only evaluations from pivot-hf's `recipes/eval_vision.py` (`results.json`).", ""]
    if projector_meta:
        lines += [
            "## Projector",
            "",
            f"`{PROJECTOR_SUBFOLDER}/` holds the first {projector_meta['num_layers']} linear layer(s) of the PIVOT "
            f"projector ({projector_meta['in_features']} -> {projector_meta['hidden_size']}, trained with a "
            f"`{projector_meta['text_model_type']}` LLM of width {projector_meta['text_hidden_size']}). Reusing "
            "the first layer frozen plus a new second layer is the paper's best Stage-3 setting (Table I, '1+1'): "
            "set `projector_init_from` to this repo and `projector_reuse_layers: 1`.",
            "",
        ]
    body = "\n".join(lines).rstrip() + "\n"
    return ModelCard.from_template(data, template_str=_CARD_TEMPLATE, body=body)


def type_name(config) -> str:
    return (getattr(config, "architectures", None) or [config.model_type])[0]


def check_model_card(card: ModelCard | str) -> ModelCardData:
    """Offline validation: the card parses back with huggingface_hub and carries the metadata an encoder needs.

    `ModelCard.validate()` asks the Hub's server; it is tried by `push_encoder_to_hub` (where the Hub is reachable),
    and this check covers what can be checked locally.
    """
    text = str(card)
    parsed = ModelCard(text)
    data = parsed.data
    roundtrip = ModelCardData(**data.to_dict())
    if roundtrip.to_dict() != data.to_dict():
        raise ValueError("Model card metadata does not survive a ModelCardData round trip.")
    if data.library_name != "transformers" or data.pipeline_tag != "image-feature-extraction":
        raise ValueError("Model card needs library_name=transformers and pipeline_tag=image-feature-extraction.")
    for name in [data.base_model] if isinstance(data.base_model, str) else data.base_model or []:
        validate_repo_id(name)
    return data


__all__ = [
    "is_hub_id",
    "read_json",
    "build_model_card",
    "check_model_card",
    "find_eval_results",
    "read_run_metadata",
    "describe_run",
    "run_method",
]
