"""Logging of a training script (open-r1 style): called by the recipes, never by a trainer constructor."""

from __future__ import annotations

import logging
import sys

import datasets
import transformers

from ..safety import install_secret_redaction


def setup_logging(training_args) -> int:
    """Log to stdout at the process's level, with Hub tokens redacted; returns the level.

    `training_args.get_process_log_level()` is TrainingArguments' `log_level` on the main process and `log_level_replica`
    on the others; transformers and datasets log at it. pivot_hf's own progress messages (trainable split, checks,
    reference cache) stay at INFO on the process that logs (`should_log`). The redacting filter goes on the root
    logger, the libraries' loggers and their handlers once those exist, before anything is logged.
    """
    log_level = training_args.get_process_log_level()
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if training_args.should_log else log_level,
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()
    install_secret_redaction()
    return log_level


__all__ = ["setup_logging"]
