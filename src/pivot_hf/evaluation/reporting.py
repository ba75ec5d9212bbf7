"""results.json + Markdown summary + PNG chart for every vision-only evaluation.

Layout of results.json:
    {"task", "primary_metric", "settings": {...}, "seeds": [...], "data": {...identity...},
     "protocol": {"reference", "knobs": {name: {"value", "reference", "source"}}, "differs_from_reference": [...]},
     "runs": [{"label", "model": {...identity...}, "metrics": {name: value}, "details": {...}}], "versions": {...}}
A run is one evaluated model; several runs in one file are what the chart compares (e.g. base vs SFT vs PIVOT).
"""

from __future__ import annotations

import datetime
import json
import math
import os

import numpy as np


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None  # JSON has no NaN; a class without positives has no recall
    return x


def _versions() -> dict:
    import sklearn
    import torch
    import transformers

    try:
        from importlib.metadata import version

        pivot = version("pivot-hf")
    except Exception:
        pivot = "unknown"
    return {
        "pivot_hf": pivot,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sklearn": sklearn.__version__,
    }


def write_results(
    output_dir: str,
    task: str,
    runs: list[dict],
    primary_metric: str,
    settings: dict,
    seeds: list[int],
    data: dict,
    chart: bool = True,
    protocol: dict | None = None,
) -> dict:
    """Write `results.json`, `summary.md` and (if `chart`) `summary.png`; return the paths. `protocol` (see
    `protocol.protocol_record`) names the knobs that differ from the reference implementation."""
    os.makedirs(output_dir, exist_ok=True)
    doc = {
        "task": task,
        "primary_metric": primary_metric,
        "settings": settings,
        "seeds": list(seeds),
        "data": data,
        "protocol": protocol,
        "runs": runs,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
    }
    paths = {"results": os.path.join(output_dir, "results.json"), "summary": os.path.join(output_dir, "summary.md")}
    with open(paths["results"], "w", encoding="utf-8") as f:
        json.dump(_jsonable(doc), f, indent=2)
    with open(paths["summary"], "w", encoding="utf-8") as f:
        f.write(markdown_summary(doc))
    if chart and runs:
        paths["chart"] = plot_runs(doc, os.path.join(output_dir, "summary.png"))
    return paths


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


def markdown_summary(doc: dict) -> str:
    """A table with one row per run and one column per metric, then the settings."""
    runs = doc["runs"]
    metrics = []
    for r in runs:
        metrics += [m for m in r["metrics"] if m not in metrics]
    lines = [f"# {doc['task']}", "", f"Primary metric: `{doc['primary_metric']}`", ""]
    lines.append("| model | " + " | ".join(metrics) + " |")
    lines.append("|---|" + "---|" * len(metrics))
    for r in runs:
        lines.append(f"| {r['label']} | " + " | ".join(_fmt(r["metrics"].get(m, "")) for m in metrics) + " |")
    lines += ["", "## Settings", ""]
    lines += [f"- `{k}`: {_fmt(v)}" for k, v in doc["settings"].items()]
    proto = doc.get("protocol")
    if proto:
        lines += ["", f"## Protocol (reference: {proto['reference']})", ""]
        differs = proto["differs_from_reference"]
        lines.append("Differs from the reference: " + (", ".join(f"`{k}`" for k in differs) if differs else "nothing"))
        lines.append("")
        for k, v in proto["knobs"].items():
            mark = " **(differs)**" if k in differs else ""
            lines.append(f"- `{k}`: {_fmt(v['value'])} (reference: {_fmt(v['reference'])}; {v['source']}){mark}")
    lines += ["", f"Seeds: {doc['seeds']}", "", f"Data: `{json.dumps(_jsonable(doc['data']), default=str)}`", ""]
    lines += [f"- {r['label']}: `{json.dumps(_jsonable(r.get('model', {})), default=str)}`" for r in runs]
    return "\n".join(lines) + "\n"


def plot_runs(doc: dict, path: str) -> str:
    """Bar chart of the primary metric per run, with the seed std as error bar when there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = doc["primary_metric"]
    labels = [r["label"] for r in doc["runs"]]
    vals = [float(r["metrics"].get(key, float("nan")) or 0.0) for r in doc["runs"]]
    std_key = key.replace("_mean", "_std") if key.endswith("_mean") else None
    errs = [float(r["metrics"].get(std_key, 0.0) or 0.0) for r in doc["runs"]] if std_key else None
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(labels) + 2), 3.6))
    bars = ax.bar(range(len(labels)), vals, yerr=errs, capsize=4, color=plt.cm.tab10.colors[: len(labels)])
    for b, v in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(labels)), [lab[-28:] for lab in labels], rotation=15, fontsize=8)
    ax.set_ylabel(key)
    ax.set_title(f"{doc['task']}: {key}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
