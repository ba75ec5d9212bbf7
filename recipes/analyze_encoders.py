"""Compare and merge vision encoders in parameter space (the "what does RL change" study's tools, on PIVOT encoders).

    # which blocks did PIVOT move, and how much (relative Frobenius change per block)
    python recipes/analyze_encoders.py --task layer_change \
        --base_model_name_or_path google/siglip2-so400m-patch16-384 \
        --tuned_model_name_or_path outputs/so400m-pivot-encoder --output_dir outputs/analysis/so400m-change
    # interpolate base -> PIVOT encoder, optionally only some blocks (the merging study transplants mid-to-late ones)
    python recipes/analyze_encoders.py --task merge --base_model_name_or_path <stage-1 encoder> \
        --tuned_model_name_or_path <pivot encoder> --alphas 0 0.5 1 [--blocks 13 14 15 ...] --output_dir <dir>
    python recipes/analyze_encoders.py --config recipes/paper/analysis/layer_change.yaml [--key value ...]

Each task writes `results.json` and a PNG (`layer_change.png` / `merge.png`); merge also writes each merged encoder as
a folder loadable like the base. Every flag is a field of `pivot_hf.analysis.AnalyzeEncodersArguments`.
"""

import logging
import sys

from trl import TrlParser

from pivot_hf.analysis import AnalyzeEncodersArguments, run


def main(argv=None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    (args,) = TrlParser(AnalyzeEncodersArguments).parse_args_and_config(argv)
    paths = run(args)
    for key, value in paths.items():
        print(f"{key}: {value}")
    return paths


if __name__ == "__main__":
    main(sys.argv[1:])
