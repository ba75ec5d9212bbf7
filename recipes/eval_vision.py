"""Vision-only evaluation of an exported encoder or a Pivot checkpoint (paper Fig. 6-8, 10, D, F).

    python recipes/eval_vision.py --task linear_probe --model_name_or_path <encoder|pivot ckpt> [more models ...] \
        --dataset_name <ImageFolder dir | saved dataset | Hub id> --output_dir <dir>
    python recipes/eval_vision.py --config eval.yaml [--key value ...]     # YAML keys = the flags below

Tasks: linear_probe, prototype, segmentation, gradcam, alignment. Each writes results.json, summary.md, summary.png.
Every flag is a field of `pivot_hf.evaluation.EvalVisionArguments` (`--help` lists them). The defaults follow the
reference code the paper names (CLIP / CLIP_benchmark sweep, patch-seg, platonic-rep); results.json's `protocol` block
records every knob next to the reference's value and lists those a run changed.
"""

import logging
import os
import sys


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from trl import TrlParser  # noqa: E402

from pivot_hf.evaluation import EvalVisionArguments, run  # noqa: E402


def main(argv=None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    (args,) = TrlParser(EvalVisionArguments).parse_args_and_config(argv)
    paths = run(args)
    for k, v in paths.items():
        print(f"{k}: {v}")
    return paths


if __name__ == "__main__":
    main(sys.argv[1:])
