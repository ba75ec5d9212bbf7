"""`make demo`: offline end-to-end PIVOT on CPU in minutes (see `pivot_hf.demo`). `--help` lists the options."""

import os
import sys


for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # the probe's per-encoder progress bars would bury the table

from pivot_hf.demo import main  # noqa: E402


if __name__ == "__main__":
    main(sys.argv[1:])
