"""Atomic checkpoints and safe resume.

A PIVOT run is hours on many GPUs; a preemption during a save must cost one checkpoint interval, not the run.
`transformers.Trainer` writes `checkpoint-N` in place, file by file, and `get_last_checkpoint` returns the highest
`checkpoint-N` folder whatever it contains: a SIGKILL after `model.safetensors` but before `trainer_state.json`
leaves a "latest" checkpoint that `--resume_from_checkpoint true` picks and then cannot load. Rotation
(`save_total_limit`) may meanwhile have deleted the last good one.

`AtomicCheckpointMixin` (mixed in ahead of the TRL trainer class) changes three things, narrowly:

1. Save: the stock `_save_checkpoint` (and every mixin after us in the MRO) writes into a staging folder
   `<output_dir>/.tmp-checkpoint-N/checkpoint-N`, redirected through `_get_output_dir` for the duration of that call
   (a private Trainer method: `compat` checks at import that `_save_checkpoint` takes its folder from it, and a save
   that lands anywhere else is an error, never a silently unmarked checkpoint). When it returns, every file is
   fsync'd, a completion marker (`pivot_checkpoint_complete.json`, listing each file and its size) is written and
   fsync'd, and the folder is renamed into `<output_dir>/checkpoint-N` (one `rename(2)` on the same filesystem).
2. Rotation: done by us on the real folder, counting complete checkpoints only and never deleting the newest complete
   one, the one just written or the best one. The stock rotation only ever sees the staging folder (one checkpoint).
3. Resume: `train(resume_from_checkpoint=...)` accepts `None` (resume automatically from the newest *complete*
   checkpoint in `output_dir` if there is one), `True`/`"true"`/`"last"` (the same, but an error when there is none),
   `False`/`"false"`/`"none"` (start fresh), or a path (a checkpoint folder, validated, or a run folder, whose newest
   complete checkpoint is used). `--resume_from_checkpoint true` on the command line arrives as the *string* "true",
   which the stock Trainer would take for a path.

The final `save_model` also writes `training_args.json` (tokens redacted) instead of the pickled `training_args.bin`,
so that a published folder holds no pickle (see `pivot_hf.safety.assert_no_pickle_files`).

Multi-process runs need `output_dir` on a filesystem shared by the saving processes (as transformers' resume does):
all ranks write into the same staging folder, then the main process finalises it after a barrier.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from typing import Any

from .compat import TESTED


logger = logging.getLogger(__name__)

PREFIX_CHECKPOINT_DIR = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR; checked in the tests
CHECKPOINT_MARKER = "pivot_checkpoint_complete.json"
STAGING_PREFIX = ".tmp-"
# World size and batch shape of the run that wrote a checkpoint (`_refuse_other_run_shape`).
RUN_IDENTITY_FILE = "run_identity.json"
TRASH_PREFIX = ".trash-"
TRAINING_ARGS_BIN = "training_args.bin"
TRAINING_ARGS_JSON = "training_args.json"
MARKER_FORMAT = 1
_VOCAB_FILES = {"tokenizer.json", "vocab.json", "merges.txt", "vocab.txt", "spiece.model"}

_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_TRUE = {"true", "yes", "y", "1", "last", "latest"}
_FALSE = {"false", "no", "n", "0", "none", "null", ""}
_AUTO = {"auto"}


# --------------------------------------------------------------------------------------------------------------------
# Durable filesystem helpers
# --------------------------------------------------------------------------------------------------------------------


def _fsync_path(path: str, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # some filesystems (and Windows) cannot open directories; durability is best effort there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """fsync every file and folder below `root` (bottom-up), so a rename published after it points to durable data.

    Without it the rename can reach the disk before the file contents do, and a power loss leaves a complete-looking
    checkpoint of zero-length files.
    """
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            _fsync_path(os.path.join(dirpath, name))
        _fsync_path(dirpath, directory=True)


def _list_files(root: str) -> dict[str, int]:
    files = {}
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if rel != CHECKPOINT_MARKER:
                files[rel] = os.path.getsize(full)
    return dict(sorted(files.items()))


def write_completion_marker(checkpoint_dir: str, global_step: int | None = None) -> str:
    """Write (atomically, fsync'd) the marker that declares `checkpoint_dir` complete; return its path.

    The marker lists every file with its size, so a file truncated or removed later is detected at resume time.
    """
    marker = {
        "format": MARKER_FORMAT,
        "complete": True,
        "global_step": global_step,
        "saved_at": time.time(),
        "files": _list_files(checkpoint_dir),
    }
    path = os.path.join(checkpoint_dir, CHECKPOINT_MARKER)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(marker, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(checkpoint_dir, directory=True)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Inspecting checkpoints
# --------------------------------------------------------------------------------------------------------------------


def checkpoint_step(path: str) -> int | None:
    """N of a `checkpoint-N` folder name, else None."""
    match = _CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def checkpoint_problem(path: str) -> str | None:
    """Why `path` is not a complete checkpoint written by `AtomicCheckpointMixin` (None when it is)."""
    if not os.path.isdir(path):
        return "not a folder"
    marker_path = os.path.join(path, CHECKPOINT_MARKER)
    if not os.path.isfile(marker_path):
        return f"no completion marker {CHECKPOINT_MARKER} (the save was interrupted, or another tool wrote it)"
    try:
        with open(marker_path, encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError) as exc:
        return f"unreadable completion marker: {exc}"
    if not isinstance(marker, dict) or marker.get("complete") is not True or not isinstance(marker.get("files"), dict):
        return "malformed completion marker"
    for rel, size in marker["files"].items():
        full = os.path.join(path, *rel.split("/"))
        if not os.path.isfile(full):
            return f"{rel} is listed in the completion marker but missing"
        if os.path.getsize(full) != size:
            return f"{rel} has {os.path.getsize(full)} bytes, the completion marker recorded {size}"
    if "trainer_state.json" not in marker["files"]:
        return "no trainer_state.json"
    return None


def is_complete_checkpoint(path: str) -> bool:
    return checkpoint_problem(path) is None


def legacy_checkpoint_problem(path: str) -> str | None:
    """Best-effort check of a checkpoint without our marker (written by stock transformers or an older version).

    Requires a parseable `trainer_state.json` and model weights whose safetensors headers parse. It cannot prove that
    the optimizer state is complete, which is why automatic resume never uses such a folder.
    """
    if not os.path.isdir(path):
        return "not a folder"
    try:
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError):
        return "missing or unreadable trainer_state.json"
    weights = [n for n in os.listdir(path) if n.endswith(".safetensors")]
    if not weights and not any(
        n.endswith(".bin") and n.startswith(("pytorch_model", "adapter_model")) for n in os.listdir(path)
    ):
        return "no model weights"
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                shards = set(json.load(f)["weight_map"].values())
        except (OSError, ValueError, KeyError):
            return "unreadable model.safetensors.index.json"
        missing = sorted(s for s in shards if not os.path.isfile(os.path.join(path, s)))
        if missing:
            return f"missing weight shards {missing}"
    from safetensors import safe_open

    for name in weights:
        try:
            with safe_open(os.path.join(path, name), framework="pt") as f:
                f.keys()
        except Exception as exc:  # safetensors raises its own error types for truncated headers
            return f"{name} is unreadable: {exc}"
    return None


def list_checkpoints(folder: str) -> list[tuple[int, str]]:
    """`(step, path)` of every `checkpoint-N` folder directly in `folder`, oldest step first (complete or not)."""
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        step = checkpoint_step(name)
        path = os.path.join(folder, name)
        if step is not None and os.path.isdir(path):
            found.append((step, path))
    return sorted(found)


def get_last_complete_checkpoint(folder: str) -> str | None:
    """The highest-step complete checkpoint in `folder`, skipping incomplete ones (unlike `get_last_checkpoint`)."""
    for _step, path in reversed(list_checkpoints(folder)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("Skipping checkpoint %s for resume: %s", path, problem)
    return None


def resolve_resume_checkpoint(value: Any, output_dir: str | None) -> str | None:
    """Turn a `resume_from_checkpoint` value into a complete checkpoint folder or None (start fresh).

    - None / "auto": the newest complete checkpoint in `output_dir` if any, else None.
    - True / "true" / "last" / "latest": the same, but an error when there is none.
    - False / "false" / "none" / "": None.
    - a path: a `checkpoint-N` folder (must be complete; a folder without our marker is accepted with a warning when
      its weights and trainer state are readable), or a run folder holding checkpoints (its newest complete one).
    """
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE:
            value = True
        elif lowered in _FALSE:
            value = False
        elif lowered in _AUTO:
            value = None
    if value is False:
        return None
    if value is None or value is True:
        found = get_last_complete_checkpoint(output_dir) if output_dir else None
        if found is None and value is True:
            raise ValueError(
                f"resume_from_checkpoint=true but output_dir {output_dir!r} holds no complete checkpoint "
                f"(a complete one contains {CHECKPOINT_MARKER}). Pass a checkpoint folder explicitly, or leave "
                "resume_from_checkpoint unset to start fresh."
            )
        return found
    path = os.path.expanduser(os.fspath(value))
    if not os.path.isdir(path):
        raise ValueError(f"resume_from_checkpoint={path!r}: no such folder")
    if checkpoint_step(path) is None and list_checkpoints(path):
        found = get_last_complete_checkpoint(path)
        if found is None:
            raise ValueError(f"resume_from_checkpoint={path!r}: none of its checkpoint-N folders is complete")
        return found
    problem = checkpoint_problem(path)
    if problem is None:
        return path
    if not os.path.isfile(os.path.join(path, CHECKPOINT_MARKER)):
        legacy = legacy_checkpoint_problem(path)
        if legacy is None:
            logger.warning(
                "Resuming from %s, which has no completion marker (%s): it was not written by pivot_hf's atomic "
                "saver, so a partial optimizer state cannot be ruled out.",
                path,
                CHECKPOINT_MARKER,
            )
            return path
        problem = f"{problem}; {legacy}"
    raise ValueError(
        f"resume_from_checkpoint={path!r} is not a complete checkpoint: {problem}. Use an earlier checkpoint-N, or "
        "`--resume_from_checkpoint true` to pick the newest complete one."
    )


# --------------------------------------------------------------------------------------------------------------------
# Housekeeping
# --------------------------------------------------------------------------------------------------------------------


def remove_stale_staging(folder: str) -> list[str]:
    """Clean up after a crash during a save or a rotation; return the folders deleted.

    A staging folder whose checkpoint is complete (the crash hit between the completion marker and the rename) and a
    `.trash-` folder that still holds a complete checkpoint (the crash hit while replacing it) are moved back into
    place when no `checkpoint-N` of that step exists: they may be the newest good state. Everything else is deleted.
    """
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isdir(path):
            continue
        if name.startswith(STAGING_PREFIX + PREFIX_CHECKPOINT_DIR):
            final_name = name[len(STAGING_PREFIX) :]
            candidate = os.path.join(path, final_name)
        elif name.startswith(TRASH_PREFIX + PREFIX_CHECKPOINT_DIR):
            final_name = name[len(TRASH_PREFIX) :]
            candidate = path
        else:
            continue
        final = os.path.join(folder, final_name)
        if checkpoint_step(final) is not None and not os.path.lexists(final) and is_complete_checkpoint(candidate):
            os.rename(candidate, final)
            _fsync_path(folder, directory=True)
            logger.warning(
                "Recovered the complete checkpoint %s from %s (a crash hit the end of its save)", final, path
            )
        if os.path.lexists(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def rotate_complete_checkpoints(
    folder: str, save_total_limit: int | None, protect: tuple[str | None, ...] = ()
) -> list[str]:
    """Keep at most `save_total_limit` complete checkpoints; return the deleted folders.

    Only complete checkpoints are counted and deleted: the newest complete one and the folders in `protect` (the one
    just written, the best one) always stay. Incomplete `checkpoint-N` folders are left alone for inspection (resume
    never picks them); the stock rotation would count them and could delete the last good checkpoint instead.
    """
    if not save_total_limit or save_total_limit <= 0:
        return []
    complete = [path for _step, path in list_checkpoints(folder) if is_complete_checkpoint(path)]
    if len(complete) <= save_total_limit:
        return []
    keep = {os.path.realpath(p) for p in protect if p}
    if complete:
        keep.add(os.path.realpath(complete[-1]))
    removed = []
    remaining = len(complete)
    for path in complete:
        if remaining <= max(save_total_limit, len(keep)):
            break
        if os.path.realpath(path) in keep:
            continue
        # Rename first so that a crash during rmtree leaves a `.trash-` folder (cleaned later), never a half-deleted
        # checkpoint-N that still carries its completion marker.
        trash = os.path.join(folder, TRASH_PREFIX + os.path.basename(path))
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(path)
        remaining -= 1
    return removed


def _publish(staged: str, final: str) -> None:
    """Move the complete `staged` folder to `final` with one rename (replacing an older `final` if present)."""
    parent = os.path.dirname(final)
    if os.path.lexists(final):
        # rename(2) cannot replace a non-empty folder: move the old one aside first. Between the two renames the
        # previous checkpoints are still there, so resume always finds a complete one.
        trash = os.path.join(parent, TRASH_PREFIX + os.path.basename(final))
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(final, trash)
        os.rename(staged, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(staged, final)
    _fsync_path(parent, directory=True)


# --------------------------------------------------------------------------------------------------------------------
# The trainer mixin
# --------------------------------------------------------------------------------------------------------------------


class AtomicCheckpointMixin:
    """Mixed into PivotSFTTrainer / PivotDPOTrainer ahead of the TRL trainer: atomic saves, safe resume, rotation."""

    _pivot_staging_run_dir: str | None = None

    # -- resume --------------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: Any = None, *args, **kwargs):
        if resume_from_checkpoint is None:
            # A script that calls `trainer.train()` without passing the argument still honours the recipe key.
            resume_from_checkpoint = getattr(self.args, "resume_from_checkpoint", None)
        resolved = self._resolve_resume_on_main_process(resume_from_checkpoint)
        if resolved is not None:
            how = "automatically " if resume_from_checkpoint is None else ""
            logger.warning("Resuming %sfrom the complete checkpoint %s", how, resolved)
            self._refuse_finished_run(resolved)
            self._refuse_other_run_shape(resolved)
        # Passing the resolved folder (never True) keeps the stock `get_last_checkpoint` out of the way.
        return super().train(resolved, *args, **kwargs)

    def _resolve_resume_on_main_process(self, resume_from_checkpoint: Any) -> str | None:
        """The checkpoint every rank resumes from, decided once by the main process and broadcast.

        Repairing the run folder (moving a staged checkpoint into place, deleting leftovers) and picking the newest
        complete checkpoint must happen in one place, before any rank looks: a rank resolving on its own could see the
        folder before or after the main process renamed a checkpoint into it, and ranks would resume from different
        steps. A refusal (no complete checkpoint, a bad path) is raised on every rank with the main process's message,
        so that no rank is left waiting in a collective.
        """
        output_dir = self.args.output_dir
        accelerator = getattr(self, "accelerator", None)
        distributed = accelerator is not None and accelerator.num_processes > 1
        decision: dict[str, Any] = {}
        if not distributed or accelerator.is_main_process:
            try:
                if self.args.should_save:
                    for path in remove_stale_staging(output_dir):
                        logger.warning("Removed %s, left by a save that was interrupted", path)
                decision["path"] = resolve_resume_checkpoint(resume_from_checkpoint, output_dir)
            except Exception as error:  # noqa: BLE001 - any error must still reach the broadcast the others wait in
                decision["error"] = f"{type(error).__name__}: {error}"
                if not distributed:
                    raise
        if distributed:
            from accelerate.utils import broadcast_object_list

            decision = broadcast_object_list([decision], from_process=0)[0]
        if "error" in decision:
            raise ValueError(f"Cannot resume (decided on the main process): {decision['error']}")
        return decision["path"]

    def _refuse_finished_run(self, checkpoint: str) -> None:
        """Resuming a checkpoint that already reached the end of its schedule would train past it (the stock loop
        runs one more step) and overwrite the finished model: stop with the ways out instead."""
        state_file = os.path.join(checkpoint, "trainer_state.json")
        if not os.path.isfile(state_file):
            return
        with open(state_file, encoding="utf-8") as f:
            state = json.load(f)
        step = int(state.get("global_step", 0))
        if self.args.max_steps and self.args.max_steps > 0:
            planned = self.args.max_steps
        elif state.get("num_train_epochs") == self.args.num_train_epochs:  # the same epoch schedule as that run
            planned = state.get("max_steps")
        else:
            planned = None
        if planned and step >= int(planned):
            raise ValueError(
                f"{checkpoint} is already at step {step}, the end of this schedule ({planned} steps): the run in "
                f"{self.args.output_dir} is finished. Fix: choose a new `output_dir`, raise `max_steps` (or "
                "`num_train_epochs`) to train further, or pass `--resume_from_checkpoint false` to start over there."
            )

    def _run_identity(self) -> dict[str, int]:
        """What fixes the data position and schedule of a checkpoint: who read which rows at which step."""
        world = int(getattr(self.accelerator, "num_processes", 1) or 1) if hasattr(self, "accelerator") else 1
        per_device = int(self.args.per_device_train_batch_size)
        accumulation = int(self.args.gradient_accumulation_steps)
        return {
            "world_size": world,
            "per_device_train_batch_size": per_device,
            "gradient_accumulation_steps": accumulation,
            "global_batch_size": world * per_device * accumulation,
        }

    def _refuse_other_run_shape(self, checkpoint: str) -> None:
        """A checkpoint resumed on another world size (or global batch) would restart each rank's data shard at a
        position computed for the old shape: rows trained twice or never, on an unchanged schedule. Refused before
        any compute, with the ways out; every rank reads the same file, so every rank raises."""
        path = os.path.join(checkpoint, RUN_IDENTITY_FILE)
        if not os.path.isfile(path):
            return  # written before run identities existed: nothing to compare
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        now = self._run_identity()
        changed = [k for k in ("world_size", "global_batch_size") if saved.get(k) is not None and saved[k] != now[k]]
        if not changed:
            return
        was = ", ".join(f"{k}={saved[k]}" for k in changed)
        is_ = ", ".join(f"{k}={now[k]}" for k in changed)
        raise ValueError(
            f"{checkpoint} was written with {was}; this launch has {is_}. Resuming would deal the rows to the ranks "
            "from a position computed for the old shape (some rows trained twice, others never). Fix: resume with "
            f"the checkpoint's shape (`accelerate launch --num_processes {saved.get('world_size')}`, "
            f"per_device_train_batch_size={saved.get('per_device_train_batch_size')}, "
            f"gradient_accumulation_steps={saved.get('gradient_accumulation_steps')}), or start a new run from its "
            f"weights: `--model_name_or_path {checkpoint} --resume_from_checkpoint false --output_dir <new folder>`."
        )

    # -- save ----------------------------------------------------------------------------------------------------

    def _get_output_dir(self, trial) -> str:
        if self._pivot_staging_run_dir is not None:
            return self._pivot_staging_run_dir
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_run_dir = os.path.join(run_dir, STAGING_PREFIX + name)  # a sibling of checkpoint-N, same filesystem
        staged = os.path.join(staging_run_dir, name)
        final = os.path.join(run_dir, name)
        existed = os.path.isdir(final)
        if self.args.should_save:
            shutil.rmtree(staging_run_dir, ignore_errors=True)  # left by an earlier crash at this very step
            os.makedirs(staging_run_dir, exist_ok=True)
        self.accelerator.wait_for_everyone()  # no rank writes its RNG file before the stale folder is gone
        self._pivot_staging_run_dir = staging_run_dir
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._pivot_staging_run_dir = None
        self.accelerator.wait_for_everyone()  # every rank's files are in the staging folder
        if not self.args.should_save:
            return
        # The stock code recorded the best checkpoint under the staging path; point it to where it will live.
        best = self.state.best_model_checkpoint
        if best and os.path.normpath(best).startswith(os.path.normpath(staging_run_dir) + os.sep):
            self.state.best_model_checkpoint = os.path.join(run_dir, os.path.relpath(best, staging_run_dir))
            if os.path.isfile(os.path.join(staged, "trainer_state.json")):
                self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
        if not os.path.isdir(staged):
            shutil.rmtree(staging_run_dir, ignore_errors=True)
            if os.path.isdir(final) and not existed:
                # The Trainer wrote the checkpoint somewhere other than the folder `_get_output_dir` gave it: it would
                # never be marked complete, and automatic resume would silently start fresh.
                raise RuntimeError(
                    f"{final} was written in place instead of in the staging folder {staging_run_dir}: this "
                    f"transformers release no longer saves checkpoints through `Trainer._get_output_dir`, so they "
                    f"cannot be made atomic. pivot_hf is tested with {TESTED}."
                )
            # Nothing was written (e.g. a subclass decided not to save): leave no half state behind.
            return
        with open(os.path.join(staged, RUN_IDENTITY_FILE), "w", encoding="utf-8") as f:
            json.dump(self._run_identity(), f, indent=2)
        fsync_tree(staged)
        write_completion_marker(staged, self.state.global_step)
        _publish(staged, final)
        shutil.rmtree(staging_run_dir, ignore_errors=True)
        for path in rotate_complete_checkpoints(
            run_dir, self.args.save_total_limit, protect=(final, self.state.best_model_checkpoint)
        ):
            logger.info("Deleted older checkpoint %s (save_total_limit=%s)", path, self.args.save_total_limit)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        from .deepspeed_save import keep_tied_tensors_tied, only_used_weight_conversions

        # Under DeepSpeed the saved names would differ from a one-process save's (see deepspeed_save): tied weights
        # cloned apart (ZeRO-1/2), renamings reversed that the checkpoint never had (ZeRO-3).
        model = self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model
        base = model.get_base_model() if hasattr(model, "get_base_model") else None
        state_dict = keep_tied_tensors_tied(state_dict, model)
        with only_used_weight_conversions(model, base):
            super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        # `training_args.bin` is a pickle of TrainingArguments (unsafe to load, and nothing in a resume needs it):
        # keep the same information as JSON, with tokens redacted.
        from ..safety import redact_file, redact_secrets

        pickled = os.path.join(output_dir, TRAINING_ARGS_BIN)
        if os.path.isfile(pickled):
            os.remove(pickled)
        with open(os.path.join(output_dir, TRAINING_ARGS_JSON), "w", encoding="utf-8") as f:
            f.write(redact_secrets(self.args.to_json_string()))
        # Scrub configs and cards so that a token that slipped into a path or a name never ships. Vocabulary files
        # are large and hold no user strings: leave them byte-identical.
        for name in os.listdir(output_dir):
            path = os.path.join(output_dir, name)
            if (
                name in _VOCAB_FILES
                or not name.endswith((".json", ".md", ".jinja", ".txt"))
                or not os.path.isfile(path)
            ):
                continue
            redact_file(path)


__all__ = [
    "AtomicCheckpointMixin",
    "CHECKPOINT_MARKER",
    "checkpoint_problem",
    "checkpoint_step",
    "fsync_tree",
    "get_last_complete_checkpoint",
    "is_complete_checkpoint",
    "legacy_checkpoint_problem",
    "list_checkpoints",
    "remove_stale_staging",
    "resolve_resume_checkpoint",
    "rotate_complete_checkpoints",
    "write_completion_marker",
]
