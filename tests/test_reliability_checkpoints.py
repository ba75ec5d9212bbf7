"""Atomic checkpoints, resume selection and rotation, in-process on a tiny Llama (seconds).

The subprocess SIGKILL tests of the real recipes are in test_reliability_resume.py; here the same mixin is driven
through `transformers.Trainer` directly, so every corner (a save interrupted by an exception, a non-atomic partial
checkpoint, truncated files, rotation with `save_total_limit`, the `resume_from_checkpoint` spellings) is cheap.
"""

import json
import os
import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from pivot_hf.trainer import checkpointing
from pivot_hf.trainer.checkpointing import (
    CHECKPOINT_MARKER,
    AtomicCheckpointMixin,
    checkpoint_problem,
    get_last_complete_checkpoint,
    resolve_resume_checkpoint,
    rotate_complete_checkpoints,
)


class TinyTrainer(AtomicCheckpointMixin, Trainer):
    pass


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=12, length=8, vocab=64):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


def _trainer(output_dir, max_steps=4, **kwargs):
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        lr_scheduler_type="cosine",
        save_strategy="steps",
        save_steps=1,
        seed=7,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1,
        **kwargs,
    )
    return TinyTrainer(model=_model(), args=args, train_dataset=_Rows())


def _final_state(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _assert_equal_states(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    trainer = _trainer(out)
    trainer.train()
    return out, _final_state(trainer)


def test_prefix_matches_transformers():
    assert checkpointing.PREFIX_CHECKPOINT_DIR == PREFIX_CHECKPOINT_DIR


def test_checkpoints_are_complete_and_pickle_free_args(reference):
    out, _ = reference
    steps = [int(p.split("-")[-1]) for p in sorted(os.listdir(out)) if p.startswith("checkpoint-")]
    assert sorted(steps) == [1, 2, 3, 4]
    for step in steps:
        folder = out / f"checkpoint-{step}"
        assert checkpoint_problem(str(folder)) is None
        marker = json.loads((folder / CHECKPOINT_MARKER).read_text())
        assert marker["global_step"] == step
        assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= set(
            marker["files"]
        )
        assert not (folder / "training_args.bin").exists() and (folder / "training_args.json").exists()
    assert not [p for p in os.listdir(out) if p.startswith((".tmp-", ".trash-"))]


def test_save_interrupted_after_model_file_resume_picks_previous(reference, tmp_path, monkeypatch):
    """An exception inside the save of checkpoint-3 (model written, optimizer not) leaves no checkpoint-3; resume
    picks checkpoint-2 and the run ends with the uninterrupted weights."""
    _, expected = reference
    out = tmp_path / "run"
    trainer = _trainer(out)
    original = Trainer._save_optimizer_and_scheduler

    def crash(self, output_dir):
        if self.state.global_step == 3:
            assert os.path.isfile(os.path.join(output_dir, "model.safetensors"))
            raise RuntimeError("simulated crash during the save")
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train()
    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", original)

    assert not (out / "checkpoint-3").exists()
    assert (out / ".tmp-checkpoint-3" / "checkpoint-3" / "model.safetensors").exists()  # the half-written save
    assert get_last_complete_checkpoint(str(out)) == str(out / "checkpoint-2")
    assert resolve_resume_checkpoint("true", str(out)) == str(out / "checkpoint-2")

    resumed = _trainer(out)
    resumed.train()  # resume_from_checkpoint unset: automatic, from the newest complete checkpoint
    assert not (out / ".tmp-checkpoint-3").exists()
    _assert_equal_states(_final_state(resumed), expected)
    assert checkpoint_problem(str(out / "checkpoint-4")) is None


def test_non_atomic_partial_checkpoint_is_never_picked(reference, tmp_path):
    """A `checkpoint-N` written in place and cut short (stock transformers killed mid-save, a copy tool, ...) is what
    `get_last_checkpoint` returns; ours skips it, and an explicit path to it is refused with the reason."""
    src, _ = reference
    out = tmp_path / "run"
    shutil.copytree(src / "checkpoint-2", out / "checkpoint-2")
    partial = out / "checkpoint-3"
    partial.mkdir()
    shutil.copy(src / "checkpoint-3" / "model.safetensors", partial / "model.safetensors")
    assert get_last_checkpoint(str(out)) == str(partial)  # the stock choice: a checkpoint that cannot resume
    assert get_last_complete_checkpoint(str(out)) == str(out / "checkpoint-2")
    with pytest.raises(ValueError, match="not a complete checkpoint.*trainer_state"):
        resolve_resume_checkpoint(str(partial), str(out))

    # A complete checkpoint whose optimizer file was later truncated or removed is detected by the marker's sizes.
    truncated = out / "checkpoint-4"
    shutil.copytree(src / "checkpoint-4", truncated)
    with open(truncated / "optimizer.pt", "r+b") as f:
        f.truncate(100)
    assert "optimizer.pt has 100 bytes" in checkpoint_problem(str(truncated))
    assert get_last_complete_checkpoint(str(out)) == str(out / "checkpoint-2")
    os.remove(truncated / "optimizer.pt")
    assert "missing" in checkpoint_problem(str(truncated))


def test_resume_argument_spellings(reference, tmp_path):
    src, _ = reference
    empty = tmp_path / "empty"
    empty.mkdir()
    assert resolve_resume_checkpoint(None, str(empty)) is None  # unset: start fresh when nothing to resume
    assert resolve_resume_checkpoint("auto", str(empty)) is None
    for no in (False, "false", "False", "no", "none", ""):
        assert resolve_resume_checkpoint(no, str(src)) is None
    for yes in (True, "true", "True", "last", "latest"):
        assert resolve_resume_checkpoint(yes, str(src)) == str(src / "checkpoint-4")
    with pytest.raises(ValueError, match="no complete checkpoint"):
        resolve_resume_checkpoint("true", str(empty))
    # A run folder given as the path resolves to its newest complete checkpoint; a checkpoint folder to itself.
    assert resolve_resume_checkpoint(str(src), None) == str(src / "checkpoint-4")
    assert resolve_resume_checkpoint(str(src / "checkpoint-2"), None) == str(src / "checkpoint-2")
    with pytest.raises(ValueError, match="no such folder"):
        resolve_resume_checkpoint(str(tmp_path / "missing"), None)
    # A checkpoint from stock transformers (no marker) but readable is accepted when named explicitly, never picked
    # automatically.
    legacy = tmp_path / "legacy" / "checkpoint-2"
    shutil.copytree(src / "checkpoint-2", legacy)
    os.remove(legacy / CHECKPOINT_MARKER)
    assert resolve_resume_checkpoint(str(legacy), None) == str(legacy)
    assert resolve_resume_checkpoint(None, str(legacy.parent)) is None


def test_rotation_keeps_last_good_checkpoint(reference, tmp_path):
    src, _ = reference
    out = tmp_path / "run"
    for step in (1, 2, 3):
        shutil.copytree(src / f"checkpoint-{step}", out / f"checkpoint-{step}")
    # A newer, incomplete checkpoint-9: the stock rotation treats it as the newest and deletes the good ones.
    (out / "checkpoint-9").mkdir()
    shutil.copy(src / "checkpoint-4" / "model.safetensors", out / "checkpoint-9" / "model.safetensors")
    removed = rotate_complete_checkpoints(str(out), 1)
    assert sorted(os.path.basename(p) for p in removed) == ["checkpoint-1", "checkpoint-2"]
    assert (out / "checkpoint-3").is_dir() and get_last_complete_checkpoint(str(out)) == str(out / "checkpoint-3")
    assert (out / "checkpoint-9").is_dir()  # left for inspection, never used
    # Protected folders (the one just written, the best one) survive even over the limit.
    shutil.copytree(src / "checkpoint-1", out / "checkpoint-1")
    assert rotate_complete_checkpoints(str(out), 1, protect=(str(out / "checkpoint-1"),)) == []
    assert rotate_complete_checkpoints(str(out), None) == [] and rotate_complete_checkpoints(str(out), 0) == []


def test_training_with_save_total_limit(tmp_path):
    out = tmp_path / "run"
    trainer = _trainer(out, max_steps=3, save_total_limit=2)
    trainer.train()
    names = sorted(p for p in os.listdir(out) if p.startswith("checkpoint-"))
    assert names == ["checkpoint-2", "checkpoint-3"]
    assert all(checkpoint_problem(str(out / n)) is None for n in names)


def test_resume_with_explicit_incomplete_path_fails_before_training(reference, tmp_path):
    src, _ = reference
    out = tmp_path / "run"
    shutil.copytree(src / "checkpoint-1", out / "checkpoint-1")
    os.remove(out / "checkpoint-1" / "trainer_state.json")
    trainer = _trainer(out)
    with pytest.raises(ValueError, match="checkpoint-1.*not a complete checkpoint"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-1"))
    assert trainer.state.global_step == 0


def test_stale_staging_is_recovered_when_complete_else_removed(reference, tmp_path):
    """A crash between the completion marker and the rename (or while an older folder was moved aside) leaves a
    complete checkpoint under a hidden name: it is moved back into place; half-written ones are deleted."""
    from pivot_hf.trainer.checkpointing import remove_stale_staging

    src, _ = reference
    out = tmp_path / "run"
    shutil.copytree(src / "checkpoint-2", out / ".tmp-checkpoint-2" / "checkpoint-2")  # complete, not renamed yet
    shutil.copytree(src / "checkpoint-1", out / ".trash-checkpoint-1")  # moved aside, replacement never arrived
    shutil.copytree(src / "checkpoint-3", out / ".tmp-checkpoint-3" / "checkpoint-3")
    os.remove(out / ".tmp-checkpoint-3" / "checkpoint-3" / CHECKPOINT_MARKER)  # the save was cut short
    removed = remove_stale_staging(str(out))
    assert sorted(os.path.basename(p) for p in removed) == [".tmp-checkpoint-2", ".tmp-checkpoint-3"]
    assert sorted(os.listdir(out)) == ["checkpoint-1", "checkpoint-2"]
    assert get_last_complete_checkpoint(str(out)) == str(out / "checkpoint-2")


def test_rerunning_a_finished_run_is_refused_not_extended(reference, tmp_path):
    """Auto-resume into an output_dir whose last checkpoint ended the schedule would train one step past it and
    overwrite the finished model: it is refused with the ways out; a longer schedule continues from there."""
    src, _ = reference
    run = tmp_path / "run"
    shutil.copytree(src, run)
    with pytest.raises(ValueError, match="already at step 4, the end of this schedule"):
        _trainer(run, max_steps=4).train()
    longer = _trainer(run, max_steps=5)
    longer.train()
    assert longer.state.global_step == 5
    home = os.path.expanduser("~")
    relative_to_home = os.path.relpath(run / "checkpoint-4", home)
    if not relative_to_home.startswith(".."):
        assert resolve_resume_checkpoint(os.path.join("~", relative_to_home), None) == str(run / "checkpoint-4")
