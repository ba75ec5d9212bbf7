"""A minimal, offline runner for lmms-eval task YAMLs: same task format, same requests, same adapter.

It exists so the `pivot` adapter can be exercised end to end without lmms-eval (the `eval` extra) or the Hub: it
reads the subset of lmms-eval's task YAML a small local task needs, builds `Instance`-shaped requests exactly as
lmms-eval does (`args = (context, gen_kwargs | target, doc_to_visual, doc_id, task, split)`), fills the model's
`task_dict`, calls `generate_until` / `loglikelihood`, and scores with the task's `process_results` and
`metric_list`. Its result dict has lmms-eval's shape (`results[task]["<metric>,none"]`). For the real 16 benchmarks use
lmms-eval itself (`recipes/eval_mllm.py`).

Supported YAML keys: task, include, dataset_path (`json`/`csv`/`parquet` with `dataset_kwargs.data_files`, relative to
the YAML's folder, or a saved dataset with `dataset_kwargs.load_from_disk: true`), dataset_name, test_split /
validation_split, output_type (`generate_until`, `loglikelihood`, `multiple_choice`), doc_to_visual, doc_to_text,
doc_to_target, doc_to_choice (a `!function`, a column name, or a Jinja template), target_delimiter,
generation_kwargs, process_results, metric_list (aggregation `mean` or a `!function`; `exact_match` with
ignore_case / ignore_punctuation), lmms_eval_specific_kwargs (its `default` entry).
"""

import importlib.util
import os
import re
import string
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml


@dataclass
class Instance:
    """The fields of lmms-eval's `Instance` that models use (`args`, `request_type`) plus bookkeeping."""

    request_type: str = field(metadata={"help": "generate_until or loglikelihood"})
    arguments: tuple = field(metadata={"help": "(context, gen_kwargs | target, doc_to_visual, doc_id, task, split)"})
    idx: int = field(default=0, metadata={"help": "index of the request within its document (choices)"})
    doc_id: int = field(default=0, metadata={"help": "document index in the split"})
    task_name: str = field(default="", metadata={"help": "task the request belongs to"})
    resps: list = field(default_factory=list, metadata={"help": "model outputs"})

    @property
    def args(self) -> tuple:
        return self.arguments


def _import_function(yaml_dir: str, dotted: str) -> Callable:
    module_name, function_name = dotted.rsplit(".", 1)
    path = os.path.join(yaml_dir, *module_name.split(".")) + ".py"
    # A unique module name per file keeps two tasks' `utils.py` apart.
    unique = f"_pivot_local_task_{abs(hash(os.path.abspath(path)))}"
    module = sys.modules.get(unique)
    if module is None:
        spec = importlib.util.spec_from_file_location(unique, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[unique] = module
        spec.loader.exec_module(module)
    return getattr(module, function_name)


def load_task_config(yaml_path: str) -> dict:
    """A task YAML with `!function module.name` resolved next to the file and `include` merged (the file wins)."""
    yaml_dir = os.path.dirname(os.path.abspath(yaml_path))

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_constructor(
        "!function", lambda loader, node: _import_function(yaml_dir, loader.construct_scalar(node))
    )
    with open(yaml_path, encoding="utf-8") as f:
        config = yaml.load(f, Loader=_Loader)
    if "include" in config:
        base = load_task_config(os.path.join(yaml_dir, config.pop("include")))
        config = {**base, **config}
    config["_yaml_dir"] = yaml_dir
    return config


def _load_split(config: dict):
    import datasets

    yaml_dir, path = config["_yaml_dir"], config["dataset_path"]
    kwargs = dict(config.get("dataset_kwargs") or {})
    if kwargs.pop("load_from_disk", False):
        dataset = datasets.load_from_disk(os.path.join(yaml_dir, path))
    else:
        for key in ("token", "cache_dir", "force_download", "local_files_only", "video", "create_link"):
            kwargs.pop(key, None)
        if "data_files" in kwargs:
            files = kwargs["data_files"]
            resolve = lambda p: p if os.path.isabs(p) else os.path.join(yaml_dir, p)  # noqa: E731
            if isinstance(files, dict):
                kwargs["data_files"] = {
                    k: resolve(v) if isinstance(v, str) else [resolve(x) for x in v] for k, v in files.items()
                }
            else:
                kwargs["data_files"] = resolve(files) if isinstance(files, str) else [resolve(x) for x in files]
        dataset = datasets.load_dataset(path, config.get("dataset_name"), **kwargs)
    split = config.get("test_split") or config.get("validation_split")
    return split, dataset


def _render(spec, doc: dict, specific_kwargs: dict | None):
    """lmms-eval's doc_to_* semantics: a callable, a column name, a Jinja template, or a literal."""
    if callable(spec):
        return spec(doc, specific_kwargs) if specific_kwargs is not None else spec(doc)
    if isinstance(spec, str):
        if spec in doc:
            return doc[spec]
        if "{{" in spec:
            import jinja2

            return jinja2.Template(spec).render(**doc)
    return spec


def _call_doc_fn(spec, doc: dict):
    return spec(doc) if callable(spec) else _render(spec, doc, None)


def _normalize(text: str, ignore_case: bool, ignore_punctuation: bool) -> str:
    text = str(text).strip()
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def _default_process(config: dict, doc: dict, results: list, choices: list | None) -> dict:
    output_type = config.get("output_type", "generate_until")
    metrics = {}
    if output_type == "multiple_choice":
        lls = [ll for ll, _ in results]
        gold = _call_doc_fn(config.get("doc_to_target"), doc)
        gold = choices.index(gold) if isinstance(gold, str) else int(gold)
        metrics["acc"] = float(max(range(len(lls)), key=lls.__getitem__) == gold)
        return metrics
    if output_type == "loglikelihood":
        ll, greedy = results[0]
        return {"perplexity": ll, "acc": float(greedy)}
    target = _call_doc_fn(config.get("doc_to_target"), doc)
    targets = target if isinstance(target, list) else [target]
    for metric in config.get("metric_list") or [{"metric": "exact_match"}]:
        if metric["metric"] == "exact_match":
            case, punct = metric.get("ignore_case", False), metric.get("ignore_punctuation", False)
            prediction = _normalize(results[0], case, punct)
            metrics["exact_match"] = float(any(prediction == _normalize(t, case, punct) for t in targets))
    return metrics


def run_task(model, yaml_path: str, limit: int | None = None) -> dict:
    """Evaluate `model` (an lmms-eval-style model such as `PivotLMM`) on one local task YAML."""
    config = load_task_config(yaml_path)
    task = config["task"]
    split, dataset = _load_split(config)
    docs = dataset[split]
    if limit is not None:
        docs = docs.select(range(min(limit, len(docs))))
    model.task_dict = {**getattr(model, "task_dict", {}), task: {split: docs}}
    specific = (config.get("lmms_eval_specific_kwargs") or {}).get("default")
    output_type = config.get("output_type", "generate_until")
    doc_to_visual = config.get("doc_to_visual")
    delimiter = config.get("target_delimiter", " ")

    requests: list[Instance] = []
    choices_per_doc: dict[int, list] = {}
    for doc_id in range(len(docs)):
        doc = docs[doc_id]
        context = str(_render(config.get("doc_to_text"), doc, specific))
        if config.get("description"):
            context = config["description"] + context
        if output_type == "generate_until":
            args = (context, dict(config.get("generation_kwargs") or {}), doc_to_visual, doc_id, task, split)
            requests.append(Instance("generate_until", args, 0, doc_id, task))
        elif output_type == "loglikelihood":
            args = (context, config.get("doc_to_target"), doc_to_visual, doc_id, task, split)
            requests.append(Instance("loglikelihood", args, 0, doc_id, task))
        elif output_type == "multiple_choice":
            choices = list(_call_doc_fn(config.get("doc_to_choice"), doc))
            choices_per_doc[doc_id] = choices
            for i, choice in enumerate(choices):
                args = (context, f"{delimiter}{choice}", doc_to_visual, doc_id, task, split)
                requests.append(Instance("loglikelihood", args, i, doc_id, task))
        else:
            raise NotImplementedError(f"The local runner does not run output_type {output_type!r}")

    by_type = defaultdict(list)
    for request in requests:
        by_type[request.request_type].append(request)
    for request_type, batch in by_type.items():
        for request, response in zip(batch, getattr(model, request_type)(batch)):
            request.resps.append(response)

    per_doc = defaultdict(list)
    for request in sorted(requests, key=lambda r: (r.doc_id, r.idx)):
        per_doc[request.doc_id].append(request.resps[0])
    process = config.get("process_results")
    samples, values = [], defaultdict(list)
    for doc_id, responses in per_doc.items():
        doc = docs[doc_id]
        if output_type == "generate_until":
            responses = [r.strip() for r in responses]
        if callable(process):
            metrics = process(doc, responses)
        else:
            metrics = _default_process(config, doc, responses, choices_per_doc.get(doc_id))
        for name, value in metrics.items():
            values[name].append(value)
        samples.append({"doc_id": doc_id, "resps": responses, "metrics": metrics})

    aggregations: dict[str, Any] = {m["metric"]: m.get("aggregation", "mean") for m in config.get("metric_list") or []}
    scores = {}
    for name, items in values.items():
        aggregation = aggregations.get(name, "mean")
        value = aggregation(items) if callable(aggregation) else sum(items) / len(items)
        scores[f"{name},none"] = value
    return {
        "results": {task: scores},
        "samples": {task: samples},
        "config": {"task": task, "split": split, "n": len(docs)},
    }


__all__ = ["Instance", "load_task_config", "run_task"]
