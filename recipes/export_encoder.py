"""Export the PIVOT-trained vision encoder of a Pivot checkpoint as a plain transformers model (+ optional Hub push).

    python recipes/export_encoder.py --model_name_or_path <pivot checkpoint> --output_dir <dir> \
        [--truncate_to_feature_layer] [--export_projector] [--base_model google/siglip2-so400m-patch16-384] \
        [--push_to_hub --hub_model_id <user/name> --hub_private_repo true --hub_revision main]
    python recipes/export_encoder.py --config export.yaml [--key value ...]     # YAML keys = the flags below

The folder loads with `transformers.AutoModel` / `AutoImageProcessor` without pivot_hf or remote code. The Hub token
comes from `HF_TOKEN` or `hf auth login`, never from a flag. Every flag is a field of
`pivot_hf.export.ExportEncoderArguments` (`--help` lists them).
"""

import logging
import sys

from trl import TrlParser

from pivot_hf.export import ExportEncoderArguments, run_export


def main(argv=None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    (args,) = TrlParser(ExportEncoderArguments).parse_args_and_config(argv)
    result = run_export(args)
    for key, value in result.items():
        print(f"{key}: {value}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
