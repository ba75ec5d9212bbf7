"""Parameter-space analysis of vision encoders: what did PIVOT change, and what does a blend of two encoders look like.

Two tools, after the "what does RL change" study's update characterisation (parameter comparison) and transferability
test (model merging):

- `layer_change(base, tuned)`: per-layer relative parameter change ``||W_tuned - W_base||_F / ||W_base||_F``, with the
  weights grouped by transformer block (plus the embeddings and the post-encoder modules). Identical encoders give
  exactly 0 everywhere; an edit of one block shows up in that block only.
- `merge_encoders(base, other, alpha)`: linear interpolation ``(1 - alpha) * base + alpha * other`` of the shared
  weights, optionally restricted to some blocks. ``alpha=0`` returns `base` and ``alpha=1`` returns `other` bit for bit.

Encoders are read straight from safetensors, so a 1B-parameter tower is compared without instantiating a model. Any of
these can be compared with any other, as long as the vision weights have the same names once normalised:
an exported PIVOT encoder (`recipes/export_encoder.py`), an original Hub encoder (vision model or dual encoder: its
text half is ignored), or a whole Pivot checkpoint (its `model.vision_tower.*` weights).

`recipes/analyze_encoders.py` is the command line; each task writes `results.json` and a PNG plot.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn


logger = logging.getLogger(__name__)

# Prefix of the vision tower inside a Pivot (LLaVA-layout) checkpoint.
PIVOT_VISION_PREFIX = "model.vision_tower."
# Top-level names of the non-vision half of dual encoders (SigLIP, CLIP): never part of the comparison.
_VISION_WRAPPER = "vision_model."
_TEXT_HALF_PREFIXES = ("text_model.", "text_projection", "logit_scale", "logit_bias", "visual_projection")
# Transformer-block lists across transformers' vision families (`layers` for SigLIP/CLIP, `layer` for DINOv2/ViT/MAE,
# `stages.N.layers` for ConvNeXt). The group key keeps the full prefix so two lists never collide.
_BLOCK_RE = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|layer|blocks|block))\.(?P<index>\d+)\.")


# ------------------------------------------------------------------------------------------------------ loading
def vision_key_map(keys) -> dict[str, str]:
    """Normalised vision name -> the name stored in the checkpoint, for every vision weight among `keys`.

    Pivot checkpoints keep their tower under `model.vision_tower.`; dual encoders carry a text half that PIVOT never
    trains; Hub checkpoints of SigLIP/CLIP store the tower under `vision_model.` while transformers 5 saves a standalone
    `SiglipVisionModel` without it. All are reduced to the bare names of the vision model, so an exported encoder, the
    original Hub checkpoint and a Pivot checkpoint line up key for key.
    """
    keys = list(keys)
    if any(k.startswith(PIVOT_VISION_PREFIX) for k in keys):
        selected = {k[len(PIVOT_VISION_PREFIX) :]: k for k in keys if k.startswith(PIVOT_VISION_PREFIX)}
    else:
        selected = {k: k for k in keys if not k.startswith(_TEXT_HALF_PREFIXES)}
    if selected and all(k.startswith(_VISION_WRAPPER) for k in selected):
        selected = {k[len(_VISION_WRAPPER) :]: v for k, v in selected.items()}
    return selected


def normalize_vision_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The vision weights of `state` under normalised names (see `vision_key_map`)."""
    return {short: state[stored] for short, stored in vision_key_map(state).items()}


def _safetensors_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"No *.safetensors file in {folder}. Only safetensors checkpoints are read (no pickle); convert the "
            "checkpoint with `save_pretrained(..., safe_serialization=True)` first."
        )
    return files


def resolve_checkpoint_folder(name_or_path: str) -> Path:
    """A local folder for `name_or_path`: the folder itself, or the Hub snapshot (weights + configs only)."""
    path = Path(os.path.expanduser(name_or_path))
    if path.is_dir():
        return path
    if path.suffix == ".safetensors" and path.is_file():
        return path.parent
    from huggingface_hub import snapshot_download

    # Honours HF_HUB_OFFLINE: offline, only an already cached snapshot resolves.
    return Path(snapshot_download(name_or_path, allow_patterns=["*.safetensors", "*.json"]))


def load_state(source: str | os.PathLike | nn.Module | dict) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder / Hub id (all safetensors shards), a module, or a state dict."""
    if isinstance(source, dict):
        return dict(source)
    if isinstance(source, nn.Module):
        return {k: v.detach() for k, v in source.state_dict().items()}
    from safetensors.torch import load_file

    source = str(source)
    if source.endswith(".safetensors") and os.path.isfile(source):
        return load_file(source)
    state: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(resolve_checkpoint_folder(source)):
        state.update(load_file(str(file)))
    return state


def load_vision_state(source) -> dict[str, torch.Tensor]:
    """The normalised vision weights of `source` (see `normalize_vision_state`)."""
    state = normalize_vision_state(load_state(source))
    if not state:
        raise ValueError(f"{source!r} holds no vision-encoder weights.")
    return state


# --------------------------------------------------------------------------------------------------- grouping
def layer_group(name: str) -> tuple[str, int | None]:
    """`(group, block index)` of a parameter: its transformer block, or its top-level module otherwise."""
    match = _BLOCK_RE.match(name)
    if match:
        return f"{match['prefix']}.{match['index']}", int(match["index"])
    parts = name.split(".")
    # `embeddings.patch_embedding.weight` -> `embeddings`, `post_layernorm.weight` -> `post_layernorm`: the top-level
    # modules of a (normalised) vision model are its embeddings, final norms and heads.
    depth = 2 if parts[0] in ("model", "encoder") and len(parts) > 2 else 1
    return ".".join(parts[:depth]), None


def _group_order(groups: dict[str, int | None], first_seen: dict[str, int]) -> list[str]:
    # Embeddings first, then blocks in numeric order (per block list), then post-encoder modules (norms, heads).
    def key(group):
        index = groups[group]
        if index is not None:
            return (1, group.rsplit(".", 1)[0], index)
        is_embedding = "embed" in group or "patch" in group or "stem" in group
        return (0 if is_embedding else 2, group, first_seen[group])

    return sorted(groups, key=key)


# ------------------------------------------------------------------------------------------------ layer change
@dataclass
class LayerChange:
    """Relative change of one group of weights (a block, the embeddings, a norm or head)."""

    group: str = field(metadata={"help": "Block (e.g. `encoder.layers.3`) or top-level module."})
    block_index: int | None = field(metadata={"help": "Index within its block list; None for non-block modules."})
    relative_change: float = field(metadata={"help": "||W_tuned - W_base||_F / ||W_base||_F over the group."})
    abs_change_norm: float = field(metadata={"help": "||W_tuned - W_base||_F over the group."})
    base_norm: float = field(metadata={"help": "||W_base||_F over the group."})
    max_abs_change: float = field(metadata={"help": "Largest single-element |difference|."})
    fraction_changed: float = field(metadata={"help": "Fraction of elements that differ at all."})
    num_parameters: int = field(metadata={"help": "Elements compared in this group."})
    num_tensors: int = field(metadata={"help": "Tensors compared in this group."})


def layer_change(base, tuned, *, eps: float = 1e-12) -> dict:
    """Per-layer relative parameter change between two encoders (folders, Hub ids, modules or state dicts).

    Returns a JSON-ready dict: `layers` (a list of `LayerChange` dicts in network order), `total_relative_change`,
    `most_changed` (the block with the largest relative change, None when nothing changed), `per_tensor`
    (name -> relative change), and the weights present in only one encoder (`only_in_base`, `only_in_tuned`; e.g. a
    head the export dropped) or with different shapes (`shape_mismatch`), which are left out of the numbers.
    """
    base_state, tuned_state = load_vision_state(base), load_vision_state(tuned)
    common = [k for k in base_state if k in tuned_state]
    mismatched = [k for k in common if base_state[k].shape != tuned_state[k].shape]
    common = [k for k in common if k not in mismatched]
    if not common:
        raise ValueError(
            "The two encoders share no weight names: are they the same architecture? "
            f"base has e.g. {list(base_state)[:3]}, tuned has e.g. {list(tuned_state)[:3]}."
        )

    sums: dict[str, dict] = OrderedDict()
    groups: dict[str, int | None] = {}
    first_seen: dict[str, int] = {}
    per_tensor = {}
    total_diff_sq = total_base_sq = 0.0
    for i, name in enumerate(common):
        # float64 so that the zero / non-zero split is exact and tiny DPO updates are not rounded away.
        a = base_state[name].detach().to(torch.float64)
        b = tuned_state[name].detach().to(torch.float64)
        diff = b - a
        diff_sq, base_sq = float(diff.pow(2).sum()), float(a.pow(2).sum())
        group, index = layer_group(name)
        groups.setdefault(group, index)
        first_seen.setdefault(group, i)
        acc = sums.setdefault(group, {"diff_sq": 0.0, "base_sq": 0.0, "max": 0.0, "changed": 0, "numel": 0, "n": 0})
        acc["diff_sq"] += diff_sq
        acc["base_sq"] += base_sq
        acc["max"] = max(acc["max"], float(diff.abs().max()) if diff.numel() else 0.0)
        acc["changed"] += int((diff != 0).sum())
        acc["numel"] += diff.numel()
        acc["n"] += 1
        per_tensor[name] = diff_sq**0.5 / max(base_sq**0.5, eps)
        total_diff_sq += diff_sq
        total_base_sq += base_sq

    layers = []
    for group in _group_order(groups, first_seen):
        acc = sums[group]
        layers.append(
            LayerChange(
                group=group,
                block_index=groups[group],
                relative_change=acc["diff_sq"] ** 0.5 / max(acc["base_sq"] ** 0.5, eps),
                abs_change_norm=acc["diff_sq"] ** 0.5,
                base_norm=acc["base_sq"] ** 0.5,
                max_abs_change=acc["max"],
                fraction_changed=acc["changed"] / max(acc["numel"], 1),
                num_parameters=acc["numel"],
                num_tensors=acc["n"],
            )
        )
    changed = [layer for layer in layers if layer.abs_change_norm > 0]
    most = max(changed, key=lambda layer: layer.relative_change) if changed else None
    return {
        "layers": [asdict(layer) for layer in layers],
        "total_relative_change": total_diff_sq**0.5 / max(total_base_sq**0.5, eps),
        "most_changed": most.group if most else None,
        "most_changed_block_index": most.block_index if most else None,
        "changed_groups": [layer.group for layer in changed],
        "per_tensor": per_tensor,
        "num_compared_tensors": len(common),
        "only_in_base": sorted(k for k in base_state if k not in tuned_state),
        "only_in_tuned": sorted(k for k in tuned_state if k not in base_state),
        "shape_mismatch": sorted(mismatched),
    }


# ----------------------------------------------------------------------------------------------------- merging
def _selected(name: str, blocks: set[int] | None) -> bool:
    if blocks is None:
        return True
    _, index = layer_group(name)
    return index is not None and index in blocks


def merge_state_dicts(
    base: dict[str, torch.Tensor],
    other: dict[str, torch.Tensor],
    alpha: float,
    blocks: list[int] | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """`(1 - alpha) * base + alpha * other` on every weight the two share (same name and shape).

    Weights only in `base`, of another shape, or outside `blocks` (when given: merge only those block indices, as the
    merging study transplants mid-to-late layers) are `base`'s, unchanged. `alpha` 0 and 1 are exact copies of the
    inputs (no arithmetic is done on them), so the endpoints of an interpolation sweep are the two encoders themselves.
    Integer / bool buffers (position ids) are never interpolated. Returns `(merged, stats)`.
    """
    if not 0.0 <= alpha <= 1.0:
        logger.warning("alpha=%s is outside [0, 1]: this extrapolates beyond the two encoders.", alpha)
    selected_blocks = set(blocks) if blocks is not None else None
    merged, n_merged, n_kept = {}, 0, 0
    for name, a in base.items():
        b = other.get(name)
        if b is None or b.shape != a.shape or not a.is_floating_point() or not _selected(name, selected_blocks):
            merged[name] = a.clone()
            n_kept += 1
            continue
        if alpha == 0.0:
            merged[name] = a.clone()
        elif alpha == 1.0:
            merged[name] = b.to(a.dtype).clone()
        else:
            # Interpolate in float32 at least, then return to the stored dtype (bf16 checkpoints stay bf16).
            compute = torch.promote_types(a.dtype, torch.float32)
            merged[name] = torch.lerp(a.to(compute), b.to(compute), alpha).to(a.dtype)
        n_merged += 1
    stats = {
        "alpha": alpha,
        "blocks": sorted(selected_blocks) if selected_blocks is not None else None,
        "merged_tensors": n_merged,
        "kept_from_base_tensors": n_kept,
        "only_in_other": sorted(k for k in other if k not in base),
    }
    return merged, stats


def merge_encoders(base, other, alpha: float, blocks: list[int] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Merge the vision weights of two encoders (folders, Hub ids, modules or state dicts); see `merge_state_dicts`.

    The result has the base's normalised vision names (those of a standalone vision model).
    """
    return merge_state_dicts(load_vision_state(base), load_vision_state(other), alpha, blocks)


def save_merged_encoder(base_name_or_path: str, merged_vision: dict[str, torch.Tensor], output_dir: str) -> str:
    """Write a merged encoder as a checkpoint folder loadable like the base.

    The base's JSON files (config, image processor) are copied, and its full state is rewritten with the merged vision
    weights put back under the base's own names (a Pivot checkpoint stays a Pivot checkpoint, a dual encoder keeps its
    text half), so `from_pretrained` on the folder works exactly as on the base.
    """
    from safetensors.torch import save_file

    base_folder = resolve_checkpoint_folder(base_name_or_path)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for file in base_folder.iterdir():
        # `.py`: a merged Pivot checkpoint keeps the remote code its `auto_map` names.
        if file.is_file() and file.suffix in (".json", ".txt", ".jinja", ".model", ".py") and "index" not in file.name:
            shutil.copy2(file, out / file.name)
    full = load_state(str(base_folder))
    stored_names = vision_key_map(full)
    for name, tensor in merged_vision.items():
        full[stored_names[name]] = tensor
    # One file, contiguous tensors; shared storage (tied weights) is broken up so safetensors accepts it.
    save_file({k: v.contiguous().clone() for k, v in full.items()}, str(out / "model.safetensors"), {"format": "pt"})
    return str(out)


def encoder_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Relative distance ||a - b|| / ||b|| over the floating-point weights the two share."""
    diff_sq = base_sq = 0.0
    for name, y in b.items():
        x = a.get(name)
        if x is None or x.shape != y.shape or not y.is_floating_point():
            continue
        diff_sq += float((x.to(torch.float64) - y.to(torch.float64)).pow(2).sum())
        base_sq += float(y.to(torch.float64).pow(2).sum())
    return diff_sq**0.5 / max(base_sq**0.5, 1e-12)


# ------------------------------------------------------------------------------------------------------ plotting
def _short(group: str) -> str:
    match = _BLOCK_RE.match(group + ".")
    if match:
        return match["index"]
    return group.rsplit(".", 1)[-1]


def plot_layer_change(results: dict, path: str, title: str = "Relative parameter change per layer") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = results["layers"]
    labels = [_short(layer["group"]) for layer in layers]
    values = [layer["relative_change"] for layer in layers]
    colors = ["tab:blue" if layer["block_index"] is not None else "tab:gray" for layer in layers]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(layers) + 2), 3.6))
    ax.bar(range(len(values)), values, color=colors)
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_xlabel("block index (grey: embeddings / norms / heads)")
    ax.set_ylabel(r"$\|W_{tuned}-W_{base}\|_F / \|W_{base}\|_F$")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_merge(sweep: list[dict], path: str, title: str = "Encoder interpolation") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = [row["alpha"] for row in sweep]
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    ax.plot(alphas, [row["distance_to_base"] for row in sweep], "o-", label="distance to base")
    ax.plot(alphas, [row["distance_to_other"] for row in sweep], "s-", label="distance to other")
    metric_rows = [row for row in sweep if row.get("metric") is not None]
    if metric_rows:
        twin = ax.twinx()
        twin.plot([r["alpha"] for r in metric_rows], [r["metric"] for r in metric_rows], "^--", color="tab:green")
        twin.set_ylabel(metric_rows[0].get("metric_name", "metric"), color="tab:green")
    ax.set_xlabel(r"$\alpha$  (0 = base, 1 = other)")
    ax.set_ylabel("relative weight distance")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------------- runners
def _write_json(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)  # a half-written results.json is never left behind


def run_layer_change(base: str, tuned: str, output_dir: str) -> dict:
    """`layer_change` + `results.json` + `layer_change.png` in `output_dir`; returns the paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = layer_change(base, tuned)
    results = {"task": "layer_change", "base": str(base), "tuned": str(tuned), **results}
    _write_json(results, out / "results.json")
    plot_layer_change(
        results, str(out / "layer_change.png"), title=f"{Path(str(tuned)).name} vs {Path(str(base)).name}"
    )
    return {"results": str(out / "results.json"), "plot": str(out / "layer_change.png")}


def run_merge(
    base: str,
    other: str,
    alphas: list[float],
    output_dir: str,
    blocks: list[int] | None = None,
    save_encoders: bool = True,
) -> dict:
    """Merge at each `alpha`; write each merged encoder (`alpha_<a>/`), `results.json` and `merge.png`."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_state, other_state = load_vision_state(base), load_vision_state(other)
    sweep = []
    for alpha in alphas:
        merged, stats = merge_state_dicts(base_state, other_state, alpha, blocks)
        row = {
            **stats,
            "distance_to_base": encoder_distance(merged, base_state),
            "distance_to_other": encoder_distance(merged, other_state),
        }
        if save_encoders:
            row["encoder_dir"] = save_merged_encoder(base, merged, str(out / f"alpha_{alpha:g}"))
        row.pop("only_in_other")
        sweep.append(row)
    results = {
        "task": "merge",
        "base": str(base),
        "other": str(other),
        "formula": "(1 - alpha) * base + alpha * other",
        "blocks": sorted(blocks) if blocks is not None else None,
        "only_in_other": sorted(k for k in other_state if k not in base_state),
        "sweep": sweep,
    }
    _write_json(results, out / "results.json")
    plot_merge(sweep, str(out / "merge.png"))
    return {"results": str(out / "results.json"), "plot": str(out / "merge.png")}


@dataclass
class AnalyzeEncodersArguments:
    """Arguments of `recipes/analyze_encoders.py` (YAML keys = CLI flags = these fields)."""

    task: str = field(
        default="layer_change",
        metadata={
            "help": "`layer_change`: per-layer relative change of `tuned` against `base`; `merge`: interpolate the two.",
            "choices": ["layer_change", "merge"],
        },
    )
    base_model_name_or_path: str = field(
        default=None,
        metadata={"help": "The reference encoder (folder or Hub id): the original encoder, e.g. the Stage-1 one."},
    )
    tuned_model_name_or_path: str = field(
        default=None,
        metadata={
            "help": "The encoder to compare / merge with (an exported PIVOT encoder or a Pivot checkpoint; merge: the "
            "`alpha = 1` end)."
        },
    )
    alphas: list[float] = field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
        metadata={"help": "merge: interpolation coefficients, (1 - alpha) * base + alpha * tuned."},
    )
    blocks: list[int] | None = field(
        default=None,
        metadata={"help": "merge: only these block indices are interpolated (default: every shared weight)."},
    )
    save_encoders: bool = field(
        default=True, metadata={"help": "merge: write each merged encoder to `<output_dir>/alpha_<a>/`."}
    )
    output_dir: str = field(default="outputs/analysis", metadata={"help": "Where results.json and the PNG go."})

    def __post_init__(self):
        if not self.base_model_name_or_path or not self.tuned_model_name_or_path:
            raise ValueError("Both `base_model_name_or_path` and `tuned_model_name_or_path` are required.")


def run(args: AnalyzeEncodersArguments) -> dict:
    """Run the task `args` names; returns the written paths."""
    if args.task == "layer_change":
        return run_layer_change(args.base_model_name_or_path, args.tuned_model_name_or_path, args.output_dir)
    if args.task == "merge":
        return run_merge(
            args.base_model_name_or_path,
            args.tuned_model_name_or_path,
            list(args.alphas),
            args.output_dir,
            blocks=list(args.blocks) if args.blocks else None,
            save_encoders=args.save_encoders,
        )
    raise ValueError(f"Unknown task {args.task!r}: use `layer_change` or `merge`.")


__all__ = [
    "AnalyzeEncodersArguments",
    "LayerChange",
    "encoder_distance",
    "layer_change",
    "layer_group",
    "load_state",
    "load_vision_state",
    "merge_encoders",
    "merge_state_dicts",
    "normalize_vision_state",
    "vision_key_map",
    "plot_layer_change",
    "plot_merge",
    "run_layer_change",
    "run",
    "run_merge",
    "save_merged_encoder",
]
