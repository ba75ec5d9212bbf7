"""MLLM benchmark evaluation: the paper's 16 benchmarks through lmms-eval, tabulated like the paper's Table 1.

- `PivotLMM` (`adapter`): lmms-eval model adapter for Pivot checkpoints, registered under the name `pivot`.
- `benchmarks`: the 16 benchmarks, their lmms-eval tasks and metrics, and the tabulator (`tabulate`, `to_markdown`).
- `local_runner.run_task`: offline runner for small tasks in lmms-eval's task-YAML format (no lmms-eval needed).

The adapter module imports torch/transformers lazily through `PivotLMM`, so `import pivot_hf.mllm_eval` stays light.
"""

from .benchmarks import (
    BENCHMARKS,
    GROUPS,
    MME_RESCALE,
    benchmark_tasks,
    compute_averages,
    load_paper_results,
    paper_row,
    scores_from_lmms_results,
    tabulate,
    to_markdown,
)
from .registration import LMMS_EVAL_AVAILABLE, MODEL_NAME, register_with_lmms_eval, require_lmms_eval


def __getattr__(name):
    # The adapter pulls in torch and transformers; load it only when asked for.
    if name == "PivotLMM":
        from .adapter import PivotLMM

        return PivotLMM
    raise AttributeError(name)


__all__ = [
    "BENCHMARKS",
    "GROUPS",
    "LMMS_EVAL_AVAILABLE",
    "MME_RESCALE",
    "MODEL_NAME",
    "PivotLMM",
    "benchmark_tasks",
    "compute_averages",
    "load_paper_results",
    "paper_row",
    "register_with_lmms_eval",
    "require_lmms_eval",
    "scores_from_lmms_results",
    "tabulate",
    "to_markdown",
]
