"""The paper's 16 MLLM benchmarks (Table U), their lmms-eval tasks, and the Table-1 style tabulator.

Scores are kept in the paper's units: percent (0-100) for every benchmark except MME, which stays on its 0-2000
perception scale in the per-benchmark columns and is divided by 20 only when averaging (paper, Appendix E.2).
A domain average is the mean of its four benchmarks; the overall average is the mean of all 16, which equals the
mean of the four domain averages because every domain has four benchmarks (checked against Table 1 / E / S).
"""

import json
import math
from dataclasses import dataclass
from importlib import resources
from typing import Any


GROUPS = ("General", "Knowledge", "OCR & Chart", "Vision-Centric")
ALL = "All"
# MME perception is a sum of 10 sub-task scores of at most 200 each; /20 maps it onto 0-100 (paper, E.2).
MME_RESCALE = 20.0


@dataclass(frozen=True)
class Benchmark:
    """One of the 16 benchmarks and where lmms-eval reports it."""

    key: str
    name: str
    group: str
    task: str
    metric: str
    # lmms-eval reports some metrics as fractions (exact_match, anls, ...) and some already in percent or raw points.
    to_paper_units: float
    note: str = ""


# Order: Table U (= the Table O / Table 1 domain grouping). Tasks are lmms-eval (v0.7) task names; metrics are the
# metric names lmms-eval writes into `results[task]` as "<metric>,<filter>".
BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("mme", "MME^P", "General", "mme", "mme_perception_score", 1.0, "perception split, 0-2000"),
    Benchmark(
        "mmbench",
        "MMB",
        "General",
        "mmbench_en_dev",
        "gpt_eval_score",
        1.0,
        "EN dev; the answer matcher calls an OpenAI judge when OPENAI_API_KEY is set (else use mmbench_en_dev_static)",
    ),
    Benchmark("seed", "SEED^I", "General", "seedbench", "seed_image", 100.0, "image split of SEED-Bench"),
    Benchmark("gqa", "GQA", "General", "gqa", "exact_match", 100.0, "testdev balanced"),
    Benchmark("sqa", "SQA^I", "Knowledge", "scienceqa_img", "exact_match", 100.0, "image split of ScienceQA test"),
    Benchmark("mmmu", "MMMU^V", "Knowledge", "mmmu_val", "mmmu_acc", 100.0, "validation split"),
    Benchmark(
        "mathvista",
        "MathVista^M",
        "Knowledge",
        "mathvista_testmini_format",
        "llm_as_judge_eval",
        1.0,
        "testmini; answer extraction uses an LLM judge (OpenAI API) in lmms-eval",
    ),
    Benchmark("ai2d", "AI2D", "Knowledge", "ai2d", "exact_match", 100.0),
    Benchmark("chartqa", "ChartQA", "OCR & Chart", "chartqa", "relaxed_overall", 100.0),
    Benchmark("ocrbench", "OCRBench", "OCR & Chart", "ocrbench", "ocrbench_accuracy", 100.0, "final score / 1000"),
    Benchmark("textvqa", "TextVQA", "OCR & Chart", "textvqa_val", "exact_match", 100.0, "validation split"),
    Benchmark("docvqa", "DocVQA", "OCR & Chart", "docvqa_val", "anls", 100.0, "validation split, ANLS"),
    Benchmark(
        "mmvp", "MMVP", "Vision-Centric", "mmvp", "mmvp_accuracy", 100.0, "per-question accuracy (300 questions)"
    ),
    Benchmark("realworldqa", "RealWorldQA", "Vision-Centric", "realworldqa", "exact_match", 100.0),
    Benchmark("cvbench_2d", "CV-Bench^2D", "Vision-Centric", "cv_bench_2d", "cv_bench_acc", 100.0),
    Benchmark("cvbench_3d", "CV-Bench^3D", "Vision-Centric", "cv_bench_3d", "cv_bench_acc", 100.0),
)
BENCHMARKS_BY_KEY = {b.key: b for b in BENCHMARKS}
BENCHMARKS_BY_TASK = {b.task: b for b in BENCHMARKS}


def benchmark_tasks(keys: list[str] | None = None) -> list[str]:
    """lmms-eval task names for the given benchmark keys (all 16 by default)."""
    keys = list(BENCHMARKS_BY_KEY) if not keys else keys
    unknown = [k for k in keys if k not in BENCHMARKS_BY_KEY]
    if unknown:
        raise ValueError(f"Unknown benchmark keys {unknown}; choose from {list(BENCHMARKS_BY_KEY)}")
    return [BENCHMARKS_BY_KEY[k].task for k in keys]


def normalized(key: str, score: float) -> float:
    """A benchmark score on the 0-100 scale used for averaging (MME perception / 20)."""
    return score / MME_RESCALE if key == "mme" else score


def compute_averages(scores: dict[str, float]) -> dict[str, Any]:
    """Domain and overall averages of per-benchmark scores (paper units, keyed by `Benchmark.key`).

    Missing benchmarks are skipped: a domain average is then over the benchmarks present, and `counts` tells how many
    went in, so a partial run is never mistaken for a full one.
    """
    averages, counts = {}, {}
    for group in (*GROUPS, ALL):
        values = [
            normalized(b.key, scores[b.key])
            for b in BENCHMARKS
            if (group == ALL or b.group == group) and scores.get(b.key) is not None
        ]
        averages[group] = sum(values) / len(values) if values else None
        counts[group] = len(values)
    return {"averages": averages, "counts": counts}


# Older lmms-eval releases wrote some metric names with a typo; their results files are still read.
_METRIC_ALIASES = {"mme_perception_score": ("mme_percetion_score",)}


def _metric_value(task_results: dict, metric: str) -> float | None:
    # lmms-eval keys metrics as "<metric>,<filter>" (filter "none" unless the task defines one) next to
    # "<metric>_stderr,<filter>"; a bare "<metric>" key is accepted too.
    names = (metric, *_METRIC_ALIASES.get(metric, ()))
    for name, value in task_results.items():
        if name.partition(",")[0] in names and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def scores_from_lmms_results(results: dict) -> dict[str, float]:
    """Per-benchmark scores in paper units from lmms-eval's results (the dict `simple_evaluate` returns, or the
    `*_results.json` it writes): `results["results"][task]["<metric>,<filter>"]`."""
    per_task = results.get("results", results)
    scores = {}
    for task, task_results in per_task.items():
        bench = BENCHMARKS_BY_TASK.get(task)
        if bench is None or not isinstance(task_results, dict):
            continue
        value = _metric_value(task_results, bench.metric)
        if value is not None and not math.isnan(value):
            scores[bench.key] = value * bench.to_paper_units
    return scores


def load_paper_results() -> dict:
    """The paper's numbers (Table 1, Table O + Table E, Table S) as stored in `paper_results.json`."""
    text = resources.files("pivot_hf.mllm_eval").joinpath("paper_results.json").read_text(encoding="utf-8")
    return json.loads(text)


def paper_row(row_id: str) -> dict:
    rows = {row["id"]: row for row in load_paper_results()["rows"]}
    if row_id not in rows:
        raise KeyError(f"No paper row {row_id!r}; available: {sorted(rows)}")
    return rows[row_id]


def paper_row_averages(row: dict) -> dict[str, float | None]:
    """Averages of a paper row: recomputed from its per-benchmark numbers when it has them (Table O / S), else the
    printed ones (Table 1 only prints averages)."""
    if "benchmarks" in row:
        return compute_averages(row["benchmarks"])["averages"]
    return {group: row["averages"].get(group) for group in (*GROUPS, ALL)}


def tabulate(scores: dict[str, float], paper_rows: list[str] = (), name: str = "this run") -> dict:
    """A Table-1 style comparison: our per-benchmark scores and averages beside the chosen paper rows."""
    ours = compute_averages(scores)
    columns = [{"name": name, "benchmarks": dict(scores), **ours}]
    for row_id in paper_rows:
        row = paper_row(row_id)
        columns.append(
            {
                "name": row_id,
                "source": row["table"],
                "protocol": row["protocol"],
                "benchmarks": dict(row.get("benchmarks", {})),
                "averages": paper_row_averages(row),
                "printed_averages": row.get("averages", {}),
            }
        )
    return {"groups": {g: [b.key for b in BENCHMARKS if b.group == g] for g in GROUPS}, "columns": columns}


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def to_markdown(table: dict) -> str:
    """Rows = benchmarks grouped by domain, then the domain and overall averages; one column per model/paper row."""
    columns = table["columns"]
    header = "| Domain | Benchmark | " + " | ".join(c["name"] for c in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 2)]
    for group in GROUPS:
        for bench in (b for b in BENCHMARKS if b.group == group):
            cells = [_fmt(c["benchmarks"].get(bench.key)) for c in columns]
            lines.append(f"| {group} | {bench.name} | " + " | ".join(cells) + " |")
    for group in (*GROUPS, ALL):
        cells = []
        for column in columns:
            cell = _fmt(column["averages"].get(group))
            counts = column.get("counts")
            expected = 16 if group == ALL else 4
            if counts is not None and cell != "-" and counts[group] < expected:
                # A partial average is not comparable with the paper's; say over how many benchmarks it ran.
                cell += f" ({counts[group]}/{expected})"
            cells.append(cell)
        label = "Average (All)" if group == ALL else f"{group} avg"
        lines.append(f"| **{label}** | | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nMME^P is shown on its 0-2000 scale and divided by 20 inside the averages.\n"


__all__ = [
    "ALL",
    "BENCHMARKS",
    "BENCHMARKS_BY_KEY",
    "BENCHMARKS_BY_TASK",
    "Benchmark",
    "GROUPS",
    "MME_RESCALE",
    "benchmark_tasks",
    "compute_averages",
    "load_paper_results",
    "normalized",
    "paper_row",
    "paper_row_averages",
    "scores_from_lmms_results",
    "tabulate",
    "to_markdown",
]
