"""`pivot-hf data ...`: convert MMPR / LLaVA data to TRL rows saved with `datasets`, and inspect any data source.

    pivot-hf data convert-mmpr <mmpr folder> --output_dir out/mmpr20k [--tokenizer Qwen/Qwen2.5-1.5B-Instruct]
        [--num_samples 20000 --seed 777 --variant nothink --new_distribution_ratio 30 --jsonl]
        -> out/mmpr20k/preference/ and out/mmpr20k/sft/ (`save_to_disk`), conversion_report.{json,md}
    pivot-hf data convert-llava <json|jsonl|parquet|folder|mixture.yaml> --output_dir out/lcs --template plain
        [--image_folder images/] -> out/lcs/sft/ + report
    pivot-hf data inspect <any dataset_name> [--kind sft] [--num_rows 3]

Every option mirrors a field of `MMPRConfig` / `LlavaConfig` (same name, same help). `dataset_name: out/mmpr20k` in a
recipe then loads the saved rows through `load_pivot_dataset`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from typing import Any

from .llava import LlavaConfig, convert_llava
from .loader import PREFERENCE_DIR, SFT_DIR, load_pivot_dataset, save_dataset
from .mmpr import MMPRConfig, convert_mmpr


def _add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    """One `--field` per dataclass field, typed from its annotation, help from its metadata."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        origin = typing.get_origin(hint)
        kwargs: dict[str, Any] = {"default": f.default, "help": f.metadata.get("help", "")}
        if hint is bool:
            kwargs["type"] = lambda s: s.lower() in ("1", "true", "yes")
        elif origin is typing.Literal:
            kwargs["choices"] = list(args)
        elif origin in (typing.Union, types.UnionType) and args and typing.get_origin(args[0]) is list:
            kwargs["nargs"] = "+"
        elif origin in (typing.Union, types.UnionType) and args:
            kwargs["type"] = args[0]
        else:
            kwargs["type"] = hint
        parser.add_argument(f"--{f.name}", **kwargs)


def _config(cls, namespace: argparse.Namespace):
    return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)})


def _load_tokenizer(name: str | None):
    if not name:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pivot-hf data", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    mmpr = sub.add_parser("convert-mmpr", help="MMPR folder -> paired DPO + SFT datasets + report")
    mmpr.add_argument("path", help="MMPR folder with meta.json")
    mmpr.add_argument("--output_dir", required=True)
    mmpr.add_argument("--tokenizer", default=None, help="Tokenizer for max_text_tokens (the authors: Qwen2.5).")
    mmpr.add_argument("--jsonl", action="store_true", help="Also write preference.jsonl / sft.jsonl.")
    _add_dataclass_args(mmpr, MMPRConfig)

    llava = sub.add_parser("convert-llava", help="LLaVA JSON/JSONL/parquet/YAML mixture -> SFT dataset + report")
    llava.add_argument("path")
    llava.add_argument("--output_dir", required=True)
    llava.add_argument("--jsonl", action="store_true", help="Also write sft.jsonl.")
    _add_dataclass_args(llava, LlavaConfig)

    inspect = sub.add_parser("inspect", help="Load any dataset_name like the recipes do and summarise it")
    inspect.add_argument("path")
    inspect.add_argument("--kind", choices=["preference", "sft"], default="preference")
    inspect.add_argument("--num_rows", type=int, default=2)
    inspect.add_argument("--num_samples", type=int, default=None)
    inspect.add_argument("--template", choices=["chat", "plain"], default="chat")
    inspect.add_argument("--image_folder", default=None)
    inspect.add_argument("--tokenizer", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "convert-mmpr":
        result = convert_mmpr(args.path, _config(MMPRConfig, args), _load_tokenizer(args.tokenizer))
        save_dataset(result.preference, os.path.join(args.output_dir, PREFERENCE_DIR), jsonl=args.jsonl)
        save_dataset(result.sft, os.path.join(args.output_dir, SFT_DIR), jsonl=args.jsonl)
        report = result.report
    elif args.command == "convert-llava":
        dataset, report = convert_llava(args.path, _config(LlavaConfig, args))
        save_dataset(dataset, os.path.join(args.output_dir, SFT_DIR), jsonl=args.jsonl)
    else:
        kind = args.kind
        dataset, report = load_pivot_dataset(
            args.path,
            kind,
            tokenizer=_load_tokenizer(args.tokenizer),
            num_samples=args.num_samples,
            template=args.template,
            image_folder=args.image_folder,
            lazy_images=False,
            show_progress=True,
        )
        print(dataset)
        for row in dataset.select(range(min(args.num_rows, len(dataset)))):
            print(json.dumps(row, indent=1, ensure_ascii=False, default=str))
        print(report.to_markdown())
        return 0 if report.check() else 1
    json_path, md_path = report.save(args.output_dir)
    print(report.to_markdown())
    print(f"saved to {args.output_dir} (report: {json_path}, {md_path})")
    return 0 if report.check() else 1


if __name__ == "__main__":
    sys.exit(main())
