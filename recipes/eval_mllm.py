"""Score a Pivot MLLM on the paper's 16 benchmarks with lmms-eval and tabulate it beside the paper (Table 1 / O / S).

Install the harness first (an extra of this package): `pip install -e ".[eval]"`.

The real run (all 16 benchmarks of Table U; needs the Hub for the datasets, a GPU in practice):

    accelerate launch --num_processes 8 recipes/eval_mllm.py \
        --model_name_or_path <pivot checkpoint> --output_dir eval/pivot-so400m \
        --tasks all --batch_size 8 --dtype bfloat16 \
        --paper_rows table_o/siglip2-so400m/pivot table_s/qwen2.5-1.5b+siglip2-so400m/dpo

which runs these lmms-eval tasks (see `pivot_hf.mllm_eval.benchmarks.BENCHMARKS`): mme, mmbench_en_dev, seedbench, gqa,
scienceqa_img, mmmu_val, mathvista_testmini_format, ai2d, chartqa, ocrbench, textvqa_val, docvqa_val, mmvp,
realworldqa, cv_bench_2d, cv_bench_3d. The same run with lmms-eval's own CLI (after
`export LMMS_EVAL_PLUGINS=pivot_hf.mllm_eval`, which makes `--model pivot` resolve to this package's adapter):

    accelerate launch --num_processes 8 -m lmms_eval --model pivot \
        --model_args pretrained=<pivot checkpoint>,dtype=bfloat16 --batch_size 8 \
        --tasks mme,mmbench_en_dev,seedbench,gqa,scienceqa_img,mmmu_val,mathvista_testmini_format,ai2d,chartqa,ocrbench,textvqa_val,docvqa_val,mmvp,realworldqa,cv_bench_2d,cv_bench_3d \
        --output_path eval/pivot-so400m/lmms_eval
    python recipes/eval_mllm.py --results_json eval/pivot-so400m/lmms_eval/<run>/<...>_results.json --output_dir eval/pivot-so400m

Other modes:
- `--tasks mme gqa mmvp`: a subset (benchmark keys or lmms-eval task names); averages say how many benchmarks they cover.
- `--results_json <file>`: tabulate an existing lmms-eval results file, no model run.
- `--local_tasks <task.yaml> ...`: offline, no lmms-eval and no Hub: run small tasks written in lmms-eval's task
  format (e.g. `tests/fixtures/mllm_eval/pivot_tiny/pivot_tiny_vqa.yaml`) through the same adapter with
  `pivot_hf.mllm_eval.local_runner`; `--local_tasks_with_lmms_eval` sends them through lmms-eval instead.

Writes to `output_dir`: `results.json` (scores, averages, paper columns, settings), `results.md` (the table), and, for
lmms-eval runs, lmms-eval's raw `lmms_eval_results.json`.
"""

import json
import os
import sys
from dataclasses import asdict, dataclass, field

from transformers import HfArgumentParser

from pivot_hf.mllm_eval.benchmarks import (
    BENCHMARKS_BY_KEY,
    BENCHMARKS_BY_TASK,
    scores_from_lmms_results,
    tabulate,
    to_markdown,
)


@dataclass
class EvalMLLMConfig:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Pivot checkpoint (folder or Hub id) to evaluate; any LLaVA-like checkpoint works."},
    )
    output_dir: str = field(default="eval_mllm_output", metadata={"help": "Where results.json / results.md go."})
    tasks: list[str] = field(
        default_factory=lambda: ["all"],
        metadata={
            "help": "Benchmark keys (mme, mmbench, ..., see BENCHMARKS) or lmms-eval task names; 'all' = the 16."
        },
    )
    batch_size: int = field(default=1, metadata={"help": "Prompts per generate() call in the adapter."})
    device: str | None = field(default=None, metadata={"help": "cuda / cpu; default cuda when available."})
    dtype: str = field(default="auto", metadata={"help": "Model dtype: auto, bfloat16, float16, float32."})
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "Cap on generated tokens (tasks ask for up to 1024); None = the task's value."}
    )
    limit: int | None = field(default=None, metadata={"help": "Documents per task (debugging); None = all."})
    paper_rows: list[str] = field(
        default_factory=lambda: ["table_o/siglip2-so400m/pivot"],
        metadata={
            "help": "Rows of paper_results.json printed beside ours: table_o/* (Stage-3 evaluation of the encoder), "
            "table_s/* (the Stage-2 MLLM itself), table1/* (averages only)."
        },
    )
    run_name: str = field(default="this run", metadata={"help": "Column header of our scores."})
    results_json: str | None = field(
        default=None, metadata={"help": "Tabulate this lmms-eval results file instead of running a model."}
    )
    local_tasks: list[str] = field(
        default_factory=list, metadata={"help": "Offline task YAMLs (lmms-eval format) to run instead of the 16."}
    )
    local_tasks_with_lmms_eval: bool = field(
        default=False, metadata={"help": "Run --local_tasks through lmms-eval (needs the eval extra) instead."}
    )
    use_chat_template: bool = field(default=True, metadata={"help": "Wrap prompts in the LLM's chat template."})
    system_prompt: str | None = field(default=None, metadata={"help": "Optional system message for every prompt."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Passed to from_pretrained."})


def resolve_tasks(tasks: list[str]) -> list[str]:
    """Benchmark keys and lmms-eval task names -> lmms-eval task names, in the paper's order for 'all'."""
    if not tasks or tasks == ["all"]:
        return [b.task for b in BENCHMARKS_BY_KEY.values()]
    resolved = []
    for name in tasks:
        for part in name.split(","):
            if part in BENCHMARKS_BY_KEY:
                resolved.append(BENCHMARKS_BY_KEY[part].task)
            elif part:  # an lmms-eval task name outside the 16 (e.g. mmbench_en_dev_static)
                resolved.append(part)
    return resolved


def _model_args(config: EvalMLLMConfig) -> dict:
    args = {
        "pretrained": config.model_name_or_path,
        "dtype": config.dtype,
        "batch_size": config.batch_size,
        "use_chat_template": config.use_chat_template,
        "trust_remote_code": config.trust_remote_code,
    }
    for key in ("device", "max_new_tokens", "system_prompt"):
        if getattr(config, key) is not None:
            args[key] = getattr(config, key)
    return args


def run_lmms_eval(config: EvalMLLMConfig, tasks: list[str], include_path: list[str] | None = None) -> dict:
    """lmms-eval's `simple_evaluate` with the `pivot` adapter; returns lmms-eval's results dict."""
    from pivot_hf.mllm_eval.registration import register_with_lmms_eval, require_lmms_eval

    require_lmms_eval()
    register_with_lmms_eval()
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from pivot_hf.mllm_eval.adapter import PivotLMM

    model = PivotLMM(**_model_args(config))
    # Local task folders only need their own YAMLs indexed; the 16 benchmarks need lmms-eval's bundled tasks.
    task_manager = TaskManager("WARNING", include_path=include_path, include_defaults=not include_path)
    results = simple_evaluate(
        model=model,
        tasks=tasks,
        batch_size=config.batch_size,
        limit=config.limit,
        task_manager=task_manager,
        log_samples=False,
        bootstrap_iters=0,
    )
    return results if results is not None else {"results": {}}  # non-zero ranks get None under accelerate


def run_local(config: EvalMLLMConfig) -> dict:
    from pivot_hf.mllm_eval.adapter import PivotLMM
    from pivot_hf.mllm_eval.local_runner import run_task

    model = PivotLMM(**_model_args(config))
    merged = {"results": {}, "samples": {}}
    for yaml_path in config.local_tasks:
        out = run_task(model, yaml_path, limit=config.limit)
        merged["results"].update(out["results"])
        merged["samples"].update(out["samples"])
    return merged


def _plain(value):
    # lmms-eval's results hold numpy scalars and "N/A" strings; keep what JSON can carry.
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def main(config: EvalMLLMConfig) -> dict:
    os.makedirs(config.output_dir, exist_ok=True)
    if config.results_json:
        with open(config.results_json, encoding="utf-8") as f:
            raw = json.load(f)
        mode = "results_json"
    elif config.local_tasks:
        if config.model_name_or_path is None:
            raise ValueError("--local_tasks needs --model_name_or_path")
        if config.local_tasks_with_lmms_eval:
            tasks = [os.path.splitext(os.path.basename(p))[0] for p in config.local_tasks]
            folders = sorted({os.path.dirname(os.path.abspath(p)) for p in config.local_tasks})
            raw = run_lmms_eval(config, tasks, include_path=folders)
            mode = "local_tasks+lmms_eval"
        else:
            raw = run_local(config)
            mode = "local_tasks"
    else:
        if config.model_name_or_path is None:
            raise ValueError("Give --model_name_or_path (or --results_json to tabulate an existing run)")
        raw = run_lmms_eval(config, resolve_tasks(config.tasks))
        mode = "lmms_eval"
        with open(os.path.join(config.output_dir, "lmms_eval_results.json"), "w", encoding="utf-8") as f:
            json.dump(_plain({k: v for k, v in raw.items() if k != "samples"}), f, indent=2)

    scores = scores_from_lmms_results(raw)
    table = tabulate(scores, paper_rows=config.paper_rows, name=config.run_name)
    other = {task: _plain(values) for task, values in raw.get("results", {}).items() if task not in BENCHMARKS_BY_TASK}
    summary = {
        "mode": mode,
        "settings": asdict(config),
        "benchmarks": scores,
        "table": table,
        "other_tasks": other,
    }
    markdown = to_markdown(table)
    if other:
        markdown += "\nOther tasks:\n\n" + "\n".join(f"- {t}: {json.dumps(v)}" for t, v in other.items()) + "\n"
    with open(os.path.join(config.output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(_plain(summary), f, indent=2)
    with open(os.path.join(config.output_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(markdown)
    print(markdown)
    return summary


def parse_args(argv: list[str] | None = None) -> EvalMLLMConfig:
    parser = HfArgumentParser(EvalMLLMConfig)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 2 and argv[0] == "--config":
        # YAML = CLI: a recipe file first, CLI flags after it override its keys.
        (config,) = parser.parse_yaml_file(argv[1])
        overrides = (
            parser.parse_args_into_dataclasses(argv[2:], return_remaining_strings=False)[0] if argv[2:] else None
        )
        if overrides is not None:
            defaults = EvalMLLMConfig()
            for key, value in asdict(overrides).items():
                if value != getattr(defaults, key):
                    setattr(config, key, value)
        return config
    (config,) = parser.parse_args_into_dataclasses(argv)
    return config


if __name__ == "__main__":
    main(parse_args())
