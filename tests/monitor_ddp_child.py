"""Child of tests/test_training_monitor.py: recipes/dpo.py under `accelerate launch`, each rank writes its own logs."""

import json
import os
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))

from dpo import main  # noqa: E402


if __name__ == "__main__":
    trainer = main(sys.argv[1:])
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    path = os.path.join(trainer.args.output_dir, f"logs_rank{trainer.args.process_index}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(logs, f)
