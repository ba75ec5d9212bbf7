"""What a run shows: the recipes' default tracker logging offline, per-part update norms and LRs, training_curves.png."""

import json
import logging
import math
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from pivot_hf import PivotForConditionalGeneration, PivotProcessor
from pivot_hf.configs import PivotSFTConfig
from pivot_hf.data import load_pivot_dataset
from pivot_hf.trainer import PivotSFTTrainer, part_of
from pivot_hf.trainer import callbacks as monitor


REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
LRS = {"language_model": 1e-4, "projector": 5e-4, "vision_tower": 1e-3}

# Runs a recipe with every outgoing connection refused and recorded: a tracker that needs the network shows up.
OFFLINE_RUNNER = textwrap.dedent(
    """
    import runpy, socket, sys
    record, script = sys.argv[1], sys.argv[2]
    real_connect = socket.socket.connect

    def connect(self, address):
        local = self.family == socket.AF_UNIX or str(address[0]) in ("127.0.0.1", "::1", "localhost")
        if not local:
            with open(record, "a") as f:
                f.write(repr(address) + "\\n")
            raise OSError("network disabled by the test")
        return real_connect(self, address)

    socket.socket.connect = connect
    sys.argv = sys.argv[2:]
    runpy.run_path(script, run_name="__main__")
    """
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tiny_pivot_factory):
    return tiny_pivot_factory("siglip")


def _default_tracker() -> str:
    """`report_to` of the headline recipe: what a user gets without choosing."""
    return yaml.safe_load((REPO / "recipes" / "so400m.yaml").read_text())["report_to"]


def _by_part(names):
    return {part: [n for n in names if part_of(n) == part] for part in LRS}


def _relative_update(before: dict, after: dict, names: list[str]) -> float:
    update = sum((after[n].double() - before[n].double()).square().sum() for n in names)
    weight = sum(before[n].double().square().sum() for n in names)
    return float((update / weight).sqrt())


def _state_dict(path) -> dict:
    model = PivotForConditionalGeneration.from_pretrained(path)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_recipes_default_to_a_local_tracker():
    assert _default_tracker() == "trackio"
    for path in [*(REPO / "recipes").glob("*.yaml"), *(REPO / "recipes" / "paper").rglob("*.yaml")]:
        config = yaml.safe_load(path.read_text())
        if "learning_rate" in config and path.name != "grpo_tiny.yaml":  # training recipes; the tiny one is a test's
            assert config["report_to"] == "trackio", path


def test_dpo_run_logs_update_norms_offline_and_draws_curves(tiny, tmp_path):
    """Stage 2 with the vision tower frozen, through recipes/dpo.py with the recipes' tracker, network refused."""
    out, trackio_dir, record = tmp_path / "dpo", tmp_path / "trackio", tmp_path / "connections.txt"
    runner = tmp_path / "offline_runner.py"
    runner.write_text(OFFLINE_RUNNER)
    flags = {
        "model_name_or_path": tiny,
        "dataset_name": str(FIXTURES / "mmpr-mini"),
        "output_dir": str(out),
        "tunable_parts": "projector,language_model",
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "gradient_checkpointing": "false",
        "logging_steps": 1,
        "report_to": _default_tracker(),
        "project": "pivot-hf-test",
        "run_name": "frozen-vision",
        "save_strategy": "steps",
        "save_steps": 1,  # checkpoint-1: the weights between the two steps, for the independent update norms
        "disable_tqdm": "true",
        "max_length": 512,
        "learning_rate": LRS["language_model"],
        "projector_lr": LRS["projector"],
        "seed": 0,
        "use_cpu": "true",
    }
    argv = [x for key, value in flags.items() for x in (f"--{key}", str(value))]
    env = {**os.environ, "TRACKIO_DIR": str(trackio_dir), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(runner), str(record), str(REPO / "recipes" / "dpo.py"), *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not record.exists(), f"the run tried the network: {record.read_text()}"

    # The update norms are in the logs, with the losses and the DPO metrics.
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    logs = {e["step"]: e for e in history if "loss" in e}
    assert sorted(logs) == [1, 2]
    for entry in logs.values():
        assert entry["update_norm/vision_tower"] == 0.0  # frozen: measured bit-identical across the step
        assert entry["update_norm/projector"] > 0 and entry["update_norm/language_model"] > 0
        assert "rewards/accuracies" in entry and "rewards/margins" in entry
        # Each part's group LR on that step; the Trainer's own `learning_rate` is group 0, the LLM's.
        assert entry["lr/language_model"] == pytest.approx(entry["learning_rate"], rel=1e-12)
        assert entry["lr/projector"] == pytest.approx(5 * entry["lr/language_model"], rel=1e-9)
        assert "lr/vision_tower" not in entry

    # ... and equal an independent computation from the saved weights: start -> checkpoint-1 -> final.
    start, middle, end = _state_dict(tiny), _state_dict(out / "checkpoint-1"), _state_dict(out)
    by_part = _by_part(list(start))
    for step, (before, after) in {1: (start, middle), 2: (middle, end)}.items():
        for part in ("projector", "language_model"):
            expected = _relative_update(before, after, by_part[part])
            assert logs[step][f"update_norm/{part}"] == pytest.approx(expected, rel=1e-4), (step, part)
        vision = [n for n in before if n.startswith("model.vision_tower.")]
        assert all(torch.equal(before[n], after[n]) for n in vision)

    # The tracker wrote the same metrics locally (trackio: one SQLite file per project).
    databases = list(trackio_dir.glob("*.db"))
    assert databases, f"no trackio database under {trackio_dir}: {sorted(trackio_dir.rglob('*'))}"
    with sqlite3.connect(databases[0]) as db:
        rows = db.execute("SELECT run_name, step, metrics FROM metrics ORDER BY step").fetchall()
    tracked = [json.loads(metrics) for run_name, _, metrics in rows if run_name == "frozen-vision"]
    norms = [m["train/update_norm/projector"] for m in tracked if "train/update_norm/projector" in m]
    assert norms == pytest.approx([logs[1]["update_norm/projector"], logs[2]["update_norm/projector"]])
    assert [m["train/update_norm/vision_tower"] for m in tracked if "train/update_norm/vision_tower" in m] == [0, 0]

    # training_curves.png: a real PNG of a readable size.
    png = out / monitor.CURVES_FILENAME
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width >= 1000 and image.height >= 700
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colors) > 50  # curves, text and axes drawn, not a blank canvas


def test_sft_run_without_tracker_logs_vision_update_and_curves(tiny, tmp_path):
    """`report_to: none` still runs; a training vision tower logs a positive update norm; SFT curves are drawn."""
    processor = PivotProcessor.from_pretrained(tiny)
    model = PivotForConditionalGeneration.from_pretrained(tiny)
    dataset, _ = load_pivot_dataset(str(FIXTURES / "mmpr-mini"), "sft")
    args = PivotSFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_checkpointing=False,
        logging_steps=2,  # only step 2 is measured (and logged)
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        max_length=512,
        learning_rate=LRS["language_model"],
        projector_lr=LRS["projector"],
        vision_tower_lr=LRS["vision_tower"],
        seed=0,
        use_cpu=True,
    )
    trainer = PivotSFTTrainer(model, args=args, train_dataset=dataset, processing_class=processor)
    assert trainer.args.report_to == []
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in logs] == [2]
    for part in LRS:
        assert logs[0][f"update_norm/{part}"] > 0
        assert logs[0][f"lr/{part}"] > 0
    assert logs[0]["lr/vision_tower"] == pytest.approx(10 * logs[0]["lr/language_model"])
    assert (tmp_path / monitor.CURVES_FILENAME).is_file()


def test_run_shorter_than_logging_steps_still_writes_curves_saying_why(tiny, tmp_path, caplog):
    """max_steps=1 with logging_steps=10 logs no training step: the PNG is still written and names the fix."""
    processor = PivotProcessor.from_pretrained(tiny)
    model = PivotForConditionalGeneration.from_pretrained(tiny)
    dataset, _ = load_pivot_dataset(str(FIXTURES / "mmpr-mini"), "sft")
    args = PivotSFTConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=1,
        gradient_checkpointing=False,
        logging_steps=10,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        max_length=512,
        use_cpu=True,
    )
    trainer = PivotSFTTrainer(model, args=args, train_dataset=dataset, processing_class=processor)
    with caplog.at_level(logging.WARNING, logger=monitor.__name__):
        trainer.train()
    assert not [e for e in trainer.state.log_history if "loss" in e]
    with Image.open(tmp_path / monitor.CURVES_FILENAME) as image:
        assert image.format == "PNG" and image.width >= 1000
    assert "No training step was logged" in caplog.text and "logging_steps" in caplog.text


def test_curves_from_an_sft_history(tmp_path):
    history = [
        {"step": s, "loss": 2.0 / s, "mean_token_accuracy": 0.1 * s, "learning_rate": 1e-4, "lr/projector": 1e-3}
        | {"lr/language_model": 1e-4, "update_norm/projector": 1e-3 / s, "update_norm/language_model": 2e-4}
        | {"update_norm/vision_tower": 0.0}
        for s in range(1, 6)
    ] + [{"step": 5, "train_runtime": 1.0}]
    path = monitor.plot_training_curves(history, str(tmp_path / "curves.png"), title="sft")
    with Image.open(path) as image:
        assert image.format == "PNG"
    assert monitor.plot_training_curves([{"step": 1, "train_runtime": 1.0}], str(tmp_path / "none.png")) is None
    assert not (tmp_path / "none.png").exists()


def test_parts_sharing_a_learning_rate_are_named_on_one_line(tmp_path, monkeypatch):
    """Equal per-part LRs (no `*_lr` set) draw on top of each other: the legend must still name every part."""
    from matplotlib.figure import Figure

    drawn = []
    real_savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (drawn.append(fig), real_savefig(fig, *a, **k))[1])
    history = [
        {"step": s, "loss": 1.0, "lr/language_model": 1e-4 / s, "lr/projector": 1e-4 / s, "lr/vision_tower": 2e-5 / s}
        for s in range(1, 4)
    ]
    monitor.plot_training_curves(history, str(tmp_path / "curves.png"))
    (lr_axes,) = [ax for ax in drawn[0].axes if ax.get_title() == "Learning rate per part"]
    assert sorted(line.get_label() for line in lr_axes.lines) == ["projector = language_model", "vision_tower"]


def test_missing_tracker_is_a_warning_not_a_crash(monkeypatch, caplog):
    monkeypatch.setattr(monitor, "is_trackio_available", lambda: False)
    args = PivotSFTConfig(output_dir="unused", report_to=["trackio", "tensorboard"], use_cpu=True)
    with caplog.at_level(logging.WARNING, logger=monitor.__name__):
        monitor._drop_missing_trackers(args)
    assert args.report_to == ["tensorboard"]
    assert "trackio" in caplog.text and "pip install trackio" in caplog.text and "report_to: none" in caplog.text


def test_two_process_run_logs_the_same_update_norms_on_every_rank(tiny, tmp_path):
    """DDP on two CPU processes: each rank measures its own replica; the numbers agree and every part moved."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    cmd += [str(Path(__file__).parent / "monitor_ddp_child.py"), "--model_name_or_path", tiny]
    cmd += ["--dataset_name", str(FIXTURES / "mmpr-mini"), "--output_dir", str(out), "--max_steps", "2"]
    cmd += ["--per_device_train_batch_size", "1", "--gradient_checkpointing", "false", "--logging_steps", "1"]
    cmd += ["--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--max_length", "512"]
    cmd += ["--learning_rate", "1e-4", "--projector_lr", "5e-4", "--vision_tower_lr", "1e-3", "--use_cpu", "true"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rank0, rank1 = (json.loads((out / f"logs_rank{r}.json").read_text()) for r in (0, 1))
    assert [e["step"] for e in rank0] == [1, 2]
    for a, b in zip(rank0, rank1):
        for part in LRS:
            assert a[f"update_norm/{part}"] == b[f"update_norm/{part}"] > 0, part
    assert (out / monitor.CURVES_FILENAME).is_file()


SHARDED_WORKER = textwrap.dedent(
    """
    import json, os, sys
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist
    from transformers.trainer_utils import IntervalStrategy

    from pivot_hf.trainer.callbacks import UpdateNormCallback


    def worker(rank, world, port, out):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        full = {  # the same full weights on every rank; each rank holds one half, as a ZeRO-3 partition
            "model.vision_tower.w": torch.arange(8.0) + 1,
            "model.multi_modal_projector.w": torch.arange(6.0) - 2,
            "model.language_model.w": torch.ones(4),
        }
        model = torch.nn.Module()
        params = {}
        for i, (name, value) in enumerate(full.items()):
            param = torch.nn.Parameter(torch.empty(0), requires_grad=name != "model.language_model.w")
            param.ds_tensor = value.chunk(world)[rank].clone()
            model.register_parameter(f"p{i}", param)
            params[name] = param
        model.named_parameters = lambda: iter(params.items())
        groups = [{"name": "vision_tower", "lr": 1e-3, "params": [params["model.vision_tower.w"]]},
                  {"name": "projector_no_decay", "lr": 5e-4, "params": [params["model.multi_modal_projector.w"]]}]
        trainer = SimpleNamespace(model=model, optimizer=SimpleNamespace(param_groups=groups), is_fsdp_enabled=False,
                                  is_deepspeed_enabled=True, args=SimpleNamespace(device=torch.device("cpu")),
                                  is_world_process_zero=lambda: rank == 0)
        callback = UpdateNormCallback(trainer)
        args = SimpleNamespace(logging_strategy=IntervalStrategy.STEPS, logging_first_step=False)
        state = SimpleNamespace(global_step=0, logging_steps=1)
        callback.on_step_begin(args, state, None)
        with torch.no_grad():  # the "optimizer step", on the local shards only
            params["model.vision_tower.w"].ds_tensor.add_(0.5 * (rank + 1))
            params["model.multi_modal_projector.w"].ds_tensor.mul_(1.01)
        state.global_step = 1
        callback.on_step_end(args, state, None)
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump(callback.pop_metrics(), f)
        dist.destroy_process_group()


    if __name__ == "__main__":
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.multiprocessing.spawn(worker, args=(2, port, sys.argv[1]), nprocs=2)
    """
)


def test_sharded_parameters_sum_over_ranks(tmp_path):
    """The ZeRO-3 / FSDP path: each rank sums its shard, the sums are all-reduced, every rank logs the full-model value."""
    script = tmp_path / "worker.py"
    script.write_text(SHARDED_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1
    vision = torch.arange(8.0, dtype=torch.float64) + 1
    vision_update = torch.cat([torch.full((4,), 0.5), torch.full((4,), 1.0)]).double()
    assert rank0["update_norm/vision_tower"] == pytest.approx(float(vision_update.norm() / vision.norm()), rel=1e-6)
    assert rank0["update_norm/projector"] == pytest.approx(0.01, rel=1e-4)  # x -> 1.01 x: |0.01 x| / |x|
    assert rank0["update_norm/language_model"] == 0.0  # frozen, unchanged
    assert rank0["lr/vision_tower"] == 1e-3 and rank0["lr/projector"] == 5e-4


class _Parts(torch.nn.Module):
    """Parameters named like a Pivot model's parts: a vision tower, a frozen projector, an LLM with a 151k x 8
    embedding (far more than one 64k-element norm piece) and a small bias."""

    def __init__(self, dtype, bf16_values):
        super().__init__()
        g = torch.Generator().manual_seed(0)

        def param(*shape, trainable=True):
            values = torch.randn(*shape, generator=g)
            if bf16_values:  # fp32 weights loaded from a bf16 checkpoint: every value is bf16-representable
                values = values.bfloat16().float()
            return torch.nn.Parameter(values.to(dtype), requires_grad=trainable)

        self.vision_tower = torch.nn.ParameterDict({"w": param(300, 70), "b": param(7)})
        self.multi_modal_projector = torch.nn.ParameterDict({"w": param(40, 30, trainable=False)})
        self.language_model = torch.nn.ParameterDict({"embed": param(151_936, 8), "b": param(5)})


def _sgd_monitor(model, lr=1e-3, **logging_args):
    """An `UpdateNormCallback` on a stand-in trainer that steps `model`'s trainable tensors with SGD at `lr`, and the
    logging arguments it reads (every step logged; `logging_args` adds fields such as `update_norm_memory_mib`)."""
    from types import SimpleNamespace

    from transformers.trainer_utils import IntervalStrategy

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=lr)
    trainer = SimpleNamespace(model=model, optimizer=optimizer, is_world_process_zero=lambda: True)
    args = SimpleNamespace(logging_strategy=IntervalStrategy.STEPS, logging_first_step=True, **logging_args)
    return monitor.UpdateNormCallback(trainer), optimizer, trainable, args


@pytest.mark.parametrize(
    "dtype, bf16_values, step",
    [
        (torch.float32, False, 1e-3),
        (torch.float32, True, 1e-3),  # the CPU fp32 norm kernel drifts most (~3e-6) on such values
        (torch.bfloat16, False, 1e-3),
        (torch.bfloat16, False, 2.0),  # weights change sign: the bf16 difference is not a bf16 value
    ],
)
def test_update_norms_equal_a_float64_computation(dtype, bf16_values, step):
    """`update_norm/<part>` of one optimizer step equals ||after - before|| / ||before|| computed in float64 from the
    weights (rel 1e-5: fp32 norms of 64k-element pieces), for fp32 and bf16 weights; a frozen part logs exactly 0."""
    from types import SimpleNamespace

    model = _Parts(dtype, bf16_values)
    callback, optimizer, trainable, args = _sgd_monitor(model, lr=step)
    state = SimpleNamespace(global_step=0, logging_steps=1)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    for p in trainable:
        p.grad = torch.randn(p.shape, generator=g).to(dtype) * p.detach().abs().mean()
    callback.on_pre_optimizer_step(args, state, None)
    optimizer.step()
    callback.on_step_end(args, state, None)
    metrics = callback.pop_metrics()
    after = {n: p.detach().clone() for n, p in model.named_parameters()}

    by_part = _by_part(before)
    for part in ("vision_tower", "language_model"):
        expected = _relative_update(before, after, by_part[part])
        assert expected > 0
        assert metrics[f"update_norm/{part}"] == pytest.approx(expected, rel=1e-5, abs=0), part
    assert metrics["update_norm/projector"] == 0.0


@pytest.mark.parametrize("step_index", [0, 1])
def test_update_norm_memory_budget_samples_pieces(step_index):
    """Past `update_norm_memory_mib`, the monitor copies every k-th 64k-element piece (k = copy size / budget,
    starting at piece `global_step % k`) and logs the float64 ratio over exactly those pieces; a part smaller than
    the stride keeps one piece; the copy stays within the budget (plus one piece per part)."""
    from types import SimpleNamespace

    model = _Parts(torch.float32, False)
    size = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    budget_mib = size / 2**20 / 3.5  # -> stride 4
    callback, optimizer, trainable, args = _sgd_monitor(model, update_norm_memory_mib=budget_mib)
    state = SimpleNamespace(global_step=step_index, logging_steps=1)

    g = torch.Generator().manual_seed(1)
    for p in trainable:
        p.grad = torch.randn(p.shape, generator=g) * p.detach().abs().mean()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    callback.on_pre_optimizer_step(args, state, None)
    copied = sum(then.numel() * 4 for pairs in callback._snapshot["trainable"].values() for *_, then in pairs)
    assert copied <= budget_mib * 2**20 + 2 * monitor._PIECE * 4
    optimizer.step()
    callback.on_step_end(args, state, None)
    metrics = callback.pop_metrics()

    piece = monitor._PIECE
    for part in ("vision_tower", "language_model"):
        names = [n for n, p in model.named_parameters() if n.startswith(part)]
        flat_before = [before[n].reshape(-1).double() for n in names]
        flat_after = [dict(model.named_parameters())[n].detach().reshape(-1).double() for n in names]
        pieces = [(b, a) for fb, fa in zip(flat_before, flat_after) for b, a in zip(fb.split(piece), fa.split(piece))]
        kept = pieces[step_index::4] or [pieces[step_index % len(pieces)]]
        update = sum(float((a - b).square().sum()) for b, a in kept)
        weight = sum(float(b.square().sum()) for b, _ in kept)
        assert metrics[f"update_norm/{part}"] == pytest.approx((update / weight) ** 0.5, rel=1e-5), part
    assert metrics["update_norm/projector"] == 0.0


def test_a_moved_part_whose_measured_weights_were_zero_is_not_logged_as_frozen(caplog):
    """Zero weights before a step that moves them (a zero-initialised bias, the one piece sampled under a budget):
    the ratio is undefined, so the part logs NaN with a warning, never 0 (which means "did not move")."""
    from types import SimpleNamespace

    model = _Parts(torch.float32, False)
    with torch.no_grad():
        for p in model.vision_tower.values():
            p.zero_()
    callback, optimizer, trainable, args = _sgd_monitor(model)
    state = SimpleNamespace(global_step=0, logging_steps=1)
    for p in trainable:
        p.grad = torch.ones_like(p)
    callback.on_pre_optimizer_step(args, state, None)
    optimizer.step()
    with caplog.at_level(logging.WARNING, logger=monitor.__name__):
        callback.on_step_end(args, state, None)
    metrics = callback.pop_metrics()
    assert math.isnan(metrics["update_norm/vision_tower"])
    assert "all zero" in caplog.text
    assert metrics["update_norm/language_model"] > 0 and metrics["update_norm/projector"] == 0.0


def test_update_norm_memory_budget_is_validated():
    from pivot_hf.configs import PivotDPOConfig, RecipeConfigError

    with pytest.raises(RecipeConfigError, match="update_norm_memory_mib"):
        PivotDPOConfig(output_dir="/tmp/x", update_norm_memory_mib=0, use_cpu=True)


def test_update_norm_of_a_non_contiguous_parameter():
    """A parameter whose values are not contiguous (a transposed weight): its flat view is a copy, so the monitor must
    read it again after the step; the logged ratio equals the float64 computation."""
    from types import SimpleNamespace

    model = _Parts(torch.float32, False)
    model.vision_tower["w"] = torch.nn.Parameter(torch.randn(70, 300, generator=torch.Generator().manual_seed(2)).t())
    assert not model.vision_tower["w"].is_contiguous()
    callback, optimizer, trainable, args = _sgd_monitor(model)
    state = SimpleNamespace(global_step=0, logging_steps=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in trainable:
        p.grad = torch.ones_like(p)
    callback.on_pre_optimizer_step(args, state, None)
    optimizer.step()
    callback.on_step_end(args, state, None)
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = _relative_update(before, after, _by_part(before)["vision_tower"])
    assert expected > 0
    assert callback.pop_metrics()["update_norm/vision_tower"] == pytest.approx(expected, rel=1e-5)
