"""Several processes and a row count that does not fill the last global batch: accelerate's `even_batches` refills
it with rows from the start of the epoch. That changes what an epoch trains, so a Pivot trainer says so by name."""

import logging

import numpy as np
import pytest
from datasets import Dataset
from PIL import Image

from pivot_hf import PivotProcessor
from pivot_hf.trainer.base import uneven_last_batch_message


@pytest.mark.parametrize(
    "rows, world, batch, even, drop, repeated",
    [
        (10, 2, 2, True, False, 2),  # 10 rows, global batch 4: the last batch holds 2, refilled with 2
        (12, 2, 2, True, False, None),  # every batch full
        (10, 1, 2, True, False, None),  # one process: the last batch is simply smaller
        (10, 2, 2, True, True, None),  # dataloader_drop_last: dropped, not refilled
        (10, 2, 2, False, False, None),  # even_batches off: ranks get uneven batches
        (7, 4, 1, True, False, 1),
        (10, 2, 4, True, False, 2),  # split_batches (below): the loader's batch of 4 is the global one
    ],
)
def test_the_refill_is_counted(rows, world, batch, even, drop, repeated):
    split = (rows, world, batch) == (10, 2, 4)
    message = uneven_last_batch_message(rows, world, batch, even, drop, split_batches=split)
    if repeated is None:
        assert message is None
    else:
        assert f"refilled with {repeated} rows" in message and f"{rows} rows" in message
        assert "dataloader_drop_last" in message


def test_a_trainer_warns_when_its_epochs_would_be_refilled(tiny_pivot_factory, tmp_path, monkeypatch, caplog):
    from transformers import TrainingArguments

    from pivot_hf import PivotForConditionalGeneration
    from pivot_hf.configs import PivotDPOConfig
    from pivot_hf.trainer import PivotDPOTrainer

    path = tiny_pivot_factory("siglip", "qwen2")
    processor = PivotProcessor.from_pretrained(path)
    rng = np.random.default_rng(0)
    rows = [
        {
            "images": [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))],
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Q{i}?"}]}],
            "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "A dog running."}]}],
        }
        for i in range(5)
    ]
    config = PivotDPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, use_cpu=True, report_to="none")
    trainer = PivotDPOTrainer(
        model=PivotForConditionalGeneration.from_pretrained(path),
        ref_model=PivotForConditionalGeneration.from_pretrained(path),
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=processor,
    )
    # Two processes as the arguments see them (the data loader itself stays on this one).
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))
    with caplog.at_level(logging.WARNING, logger="pivot_hf.trainer.base"):
        trainer.get_train_dataloader()
    assert "5 rows" in caplog.text and "refilled with 3 rows" in caplog.text
