"""Multi-rank resume: the main process repairs the run folder and picks the checkpoint, every rank resumes from it.

A 2-process CPU run (gloo, `accelerate_configs/ddp.yaml` with the machine keys set for this box) is SIGKILLed during
step 3, after checkpoint-2 was written. The folder is then left as a crash between the completion marker and the final
rename leaves it: checkpoint-2 complete but still in its staging folder. On resume the main process moves it into
place; a rank deciding on its own could look before that rename and resume from checkpoint-1 instead. Both ranks must
resume from checkpoint-2 and end with the weights of an uninterrupted 2-process run.
"""

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pivot_hf.trainer.checkpointing import STAGING_PREFIX, get_last_complete_checkpoint
from test_distributed_fsdp import _recipe_args, cpu_accelerate_config, run_launched


pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


@pytest.fixture(scope="module")
def tiny(tiny_pivot_factory):
    return tiny_pivot_factory("siglip")


def _args(tiny, output_dir):
    return _recipe_args(tiny, output_dir, 1, "--save_strategy", "steps", "--save_steps", "1")


def test_two_process_sigkill_then_resume_matches_uninterrupted(tiny, tmp_path):
    config = cpu_accelerate_config("ddp.yaml", tmp_path)
    ref, run = tmp_path / "uninterrupted", tmp_path / "run"
    logs = [tmp_path / "uninterrupted.log", tmp_path / "killed.log", tmp_path / "resumed.log"]
    assert run_launched(config, _args(tiny, ref), logs[0]) == 0, logs[0].read_text()[-4000:]

    rc = run_launched(config, _args(tiny, run), logs[1], env_extra={"PIVOT_TEST_KILL_BEFORE_OPTIMIZER_STEP": "2"})
    assert rc != 0, "the run was meant to die by SIGKILL"
    assert "Signals.SIGKILL" in logs[1].read_text() or "exitcode: -9" in logs[1].read_text()
    assert not (run / "model.safetensors").exists(), "the killed run must not have finished"
    assert get_last_complete_checkpoint(str(run)) == str(run / "checkpoint-2")
    # A crash between the completion marker and the rename: the newest complete checkpoint is still staged.
    staging = run / f"{STAGING_PREFIX}checkpoint-2"
    staging.mkdir()
    os.rename(run / "checkpoint-2", staging / "checkpoint-2")
    assert get_last_complete_checkpoint(str(run)) == str(run / "checkpoint-1")

    assert run_launched(config, _args(tiny, run), logs[2]) == 0, logs[2].read_text()[-4000:]
    resumed = {p.name: p.read_text() for p in run.glob("resumed_from.rank*")}
    assert resumed == {f"resumed_from.rank{r}": str(run / "checkpoint-2") for r in (0, 1)}, resumed
    assert "Recovered the complete checkpoint" in logs[2].read_text()

    a, b = load_file(str(ref / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    print(f"{len(a)} tensors, max |uninterrupted - resumed| = {worst:.3g}")
    assert worst <= 1e-6
    start = load_file(str(Path(tiny) / "model.safetensors"))
    assert any(not torch.equal(start[k], b[k]) for k in start if "vision_tower" in k)


@pytest.mark.parametrize("bad_value", [1, ["checkpoint-2"]])
def test_main_process_failure_reaches_the_broadcast_so_no_rank_waits(bad_value, tmp_path, monkeypatch):
    """Whatever the main process's resolution raises (here the TypeError of a non-path value), it must still take
    part in the broadcast the other ranks are waiting in, and every rank then raises its message: a main process that
    raised before the collective would leave the others blocked until the process-group timeout."""
    from types import SimpleNamespace

    import accelerate.utils

    from pivot_hf.trainer.checkpointing import AtomicCheckpointMixin

    broadcasts = []

    def broadcast_object_list(objects, from_process=0):
        broadcasts.append(list(objects))
        return objects

    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", broadcast_object_list)
    trainer = object.__new__(AtomicCheckpointMixin)
    trainer.args = SimpleNamespace(output_dir=str(tmp_path), should_save=True)
    trainer.accelerator = SimpleNamespace(num_processes=2, is_main_process=True)
    with pytest.raises(ValueError, match="decided on the main process.*TypeError"):
        trainer._resolve_resume_on_main_process(bad_value)
    assert len(broadcasts) == 1 and "TypeError" in broadcasts[0][0]["error"], broadcasts
    trainer.accelerator = SimpleNamespace(num_processes=1, is_main_process=True)
    with pytest.raises(TypeError):  # one process: the original error, unchanged
        trainer._resolve_resume_on_main_process(bad_value)


def test_resume_on_another_world_size_is_refused_before_compute(tiny, tmp_path):
    """A 1-process checkpoint resumed by 2 processes (same global batch) would deal the rows from a position computed
    for one rank: refused on every rank before any step, naming both shapes and the fixes."""
    import subprocess
    import sys

    from test_distributed_fsdp import CHILD, _env

    run = tmp_path / "run"
    first = _recipe_args(tiny, run, 2, "--save_strategy", "steps", "--save_steps", "1", "--max_steps", "1")
    proc = subprocess.run([sys.executable, str(CHILD), *first], env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    identity = (run / "checkpoint-1" / "run_identity.json").read_text()
    assert '"world_size": 1' in identity and '"global_batch_size": 2' in identity
    state_before = (run / "trainer_state.json").read_text()

    log = tmp_path / "resume.log"
    config = cpu_accelerate_config("ddp.yaml", tmp_path)
    rc = run_launched(config, _recipe_args(tiny, run, 1, "--save_strategy", "steps", "--save_steps", "1"), log)
    text = log.read_text()
    assert rc != 0
    assert "was written with world_size=1; this launch has world_size=2" in text, text[-4000:]
    assert "--num_processes 1" in text and "--resume_from_checkpoint false" in text
    assert not (run / "checkpoint-2").exists() and (run / "trainer_state.json").read_text() == state_before
    assert "'loss'" not in text  # no training step ran
