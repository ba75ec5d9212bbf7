"""Merge the output of a `use_peft` run (PEFT adapter + the parts trained in full) into a plain Pivot checkpoint.

    python recipes/merge_adapter.py --adapter_dir <output_dir of the run> --output_dir <merged checkpoint> \
        [--base_model_name_or_path <base Pivot checkpoint>]

The base defaults to the checkpoint the adapter records (`base_model_name_or_path` in `adapter_config.json`). The
merged folder is an ordinary Pivot checkpoint (model, processor, run summary): it loads with
`AutoModelForImageTextToText`, continues training, and exports its encoder (`recipes/export_encoder.py`).
"""

import logging
import sys
from dataclasses import dataclass, field

from trl import TrlParser

from pivot_hf.export import merge_adapter_checkpoint


@dataclass
class MergeAdapterArguments:
    adapter_dir: str = field(metadata={"help": "Output folder of a `use_peft` run (holds adapter_config.json)."})
    output_dir: str = field(metadata={"help": "Where the merged Pivot checkpoint is written."})
    base_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base Pivot checkpoint (default: the one recorded in the adapter)."}
    )


def main(argv=None) -> str:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    (args,) = TrlParser(MergeAdapterArguments).parse_args_and_config(argv)
    return merge_adapter_checkpoint(args.adapter_dir, args.output_dir, args.base_model_name_or_path)


if __name__ == "__main__":
    print(main(sys.argv[1:]))
