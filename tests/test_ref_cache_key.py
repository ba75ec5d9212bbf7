"""Cached reference log-probs are reused only when nothing that changes them changed.

At step 1 the policy equals the reference, so the sigmoid DPO loss is exactly ln 2: a stale cache (reference values of
another configuration) shows up as a step-1 loss != ln 2.
"""

import logging
import math

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image
from safetensors.torch import load_file

from pivot_hf import PivotForConditionalGeneration, PivotProcessor
from pivot_hf.configs import PivotDPOConfig
from pivot_hf.data import sequence_lengths
from pivot_hf.processing_pivot import multimodal_chat_template
from pivot_hf.trainer.dpo import PivotDPOTrainer


LN2 = math.log(2.0)


def _rows(n=4, seed=0):
    rng = np.random.default_rng(seed)
    answers = [
        ("A cat sitting on a mat in the sun.", "A dog running on grass quickly."),
        ("Blue sky with clouds.", "Red."),
        ("Three apples on a table", "Three pears"),
        ("Green", "Yellow and a bit of green"),
    ]
    rows = []
    for i in range(n):
        chosen, rejected = answers[i % 4]
        image = Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8))
        rows.append(
            {
                "images": [image],
                "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
                "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
                "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}],
            }
        )
    return Dataset.from_list(rows)


@pytest.fixture(scope="module")
def tiny(tiny_pivot_factory):
    return tiny_pivot_factory("siglip", "qwen2")


def _run(path, output_dir, dataset, *, attn="sdpa", max_length=512, edit_model=None, edit_processor=None):
    processor = PivotProcessor.from_pretrained(path)
    model = PivotForConditionalGeneration.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    if edit_model:
        edit_model(model)
    if edit_processor:
        edit_processor(processor)
    args = PivotDPOConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        max_steps=1,
        learning_rate=1e-3,
        beta=0.1,
        max_length=max_length,
        precompute_ref_log_probs=True,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        check_tunable_parts_changed=False,
        seed=0,
    )
    trainer = PivotDPOTrainer(model, None, args=args, train_dataset=dataset, processing_class=processor)
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log][0]


def _caches(output_dir):
    return sorted((output_dir / "ref_logps").glob("train-*.safetensors"))


def _set_feature_layer(model):
    model.config.vision_feature_layer = -3


def _set_mean(processor):
    processor.image_processor.image_mean = [0.2, 0.4, 0.6]
    processor.image_processor.image_std = [0.3, 0.3, 0.3]


def _set_template(processor):
    processor.chat_template = multimodal_chat_template(
        processor.tokenizer.chat_template, processor.image_token, "Answer in one word."
    )


CHANGES = {
    "feature_layer": {"edit_model": _set_feature_layer},
    "image_mean_std": {"edit_processor": _set_mean},
    "chat_template": {"edit_processor": _set_template},
    # One below the longest row: that row is dropped (`exceeds_max_length`), so the cached rows really change.
    "max_length": {"max_length": "longest - 1"},
    "attn_implementation": {"attn": "eager"},
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_rerun_after_a_change_recomputes_the_reference(tiny, tmp_path, caplog, change):
    dataset = _rows()
    first = _run(tiny, tmp_path, dataset)
    assert first == pytest.approx(LN2, abs=1e-5)
    [old] = _caches(tmp_path)
    caplog.set_level(logging.INFO, logger="pivot_hf.trainer.fast_dpo")
    kwargs = dict(CHANGES[change])
    if kwargs.get("max_length") == "longest - 1":
        processor = PivotProcessor.from_pretrained(tiny)
        kwargs["max_length"] = max(sequence_lengths(dataset[:], processor, processor.num_image_tokens())) - 1
    loss = _run(tiny, tmp_path, dataset, **kwargs)
    assert loss == pytest.approx(LN2, abs=1e-5)
    assert "computing them" in caplog.text and "is stale" in caplog.text
    new = [p for p in _caches(tmp_path) if p != old]
    assert len(new) == 1
    before, after = load_file(str(old))["ref_chosen_logps"], load_file(str(new[0]))["ref_chosen_logps"]
    if change == "max_length":
        assert len(after) == len(before) - 1
    elif change != "attn_implementation":  # eager vs sdpa agree to ~1e-6: only the key must differ there
        assert not torch.allclose(before, after)


def test_rerun_without_change_reuses_the_cache(tiny, tmp_path, caplog):
    dataset = _rows()
    _run(tiny, tmp_path, dataset)
    [cache] = _caches(tmp_path)
    stamp = cache.stat().st_mtime_ns
    caplog.set_level(logging.INFO, logger="pivot_hf.trainer.fast_dpo")
    loss = _run(tiny, tmp_path, dataset)
    assert loss == pytest.approx(LN2, abs=1e-5)
    assert "reusing the cache" in caplog.text
    assert _caches(tmp_path) == [cache] and cache.stat().st_mtime_ns == stamp


def test_identity_covers_image_size_dtype_and_weights(tiny):
    """What the end-to-end reruns above do not vary: image size (NaFlex patch budget), dtype, one changed weight."""
    from pivot_hf.trainer.fast_dpo import reference_identity

    processor = PivotProcessor.from_pretrained(tiny)
    model = PivotForConditionalGeneration.from_pretrained(tiny, dtype=torch.float32)
    base = reference_identity(model, processor)
    assert reference_identity(model, processor) == base
    processor.image_processor.size = {"height": 48, "width": 48}
    assert reference_identity(model, processor)["image_processor"] != base["image_processor"]
    with torch.no_grad():
        model.model.multi_modal_projector.linear_1.bias[0] += 1e-3
    assert reference_identity(model, None)["weights"] != base["weights"]
    half = reference_identity(model.to(torch.bfloat16), None)
    assert half["dtype"] == "torch.bfloat16" != base["dtype"]


def _path_rows(folder, seed):
    """The rows of `_rows`, with their images as PNG files under `folder` (written with pixels of `seed`)."""
    rows = _rows(seed=seed).to_list()
    folder.mkdir(exist_ok=True)
    for i, row in enumerate(rows):
        path = folder / f"{i}.png"
        Image.fromarray(np.random.default_rng(seed * 100 + i).integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(path)
        row["images"] = [str(path)]
    return Dataset.from_list(rows)


def test_replaced_images_at_the_same_paths_recompute_the_reference(tiny, tmp_path, caplog):
    """Same paths, same rows, same fingerprint: only the pixels changed. The cache key holds the images' content, so
    the rerun into the same output_dir recomputes, the log names the images, and step 1 is exactly ln 2 again."""
    images, out = tmp_path / "images", tmp_path / "run"
    first = _run(tiny, out, _path_rows(images, seed=1))
    assert first == pytest.approx(LN2, abs=1e-5)
    [old] = _caches(out)
    caplog.set_level(logging.INFO, logger="pivot_hf.trainer.fast_dpo")
    replaced = _path_rows(images, seed=2)  # overwrites every file in place
    loss = _run(tiny, out, replaced)
    assert loss == pytest.approx(LN2, abs=1e-5)
    assert "computing them" in caplog.text and "images" in caplog.text.split("is stale:")[1]
    assert len(_caches(out)) == 2 and old in _caches(out)
