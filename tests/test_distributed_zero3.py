"""DeepSpeed ZeRO-3 / ZeRO-2 without a GPU: 2 processes on the CPU (DeepSpeed's CPU accelerator, gloo), launched as the
README writes it for CPU (`accelerate launch --config_file accelerate_configs/zero3.yaml --num_processes 2
--mixed_precision no ... --use_cpu true`, the shipped config unchanged), against the same run in one plain process.

Each run is shared by several assertions (module-scoped fixtures): 3 optimizer steps, one torch thread per process.
DeepSpeed compiles a small C++ op with the machine's g++ the first time it starts (cached under ~/.cache/torch_extensions).
"""

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from test_distributed_fsdp import CHILD, LRS, REPO, STEPS, _env, _losses, _recipe_args


pytest.importorskip("deepspeed")
pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: str, args: list[str], log: Path, *flags: str, child: bool = True, timeout: int = 900) -> int:
    """`accelerate launch --config_file accelerate_configs/<config> --num_processes 2 --mixed_precision no [flags]
    recipes/<script>.py ...`: the shipped config with the README's CPU overrides. With `child`, the recipe runs under
    tests/distributed_child.py, which reports how the model was held after the final save."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    cmd += ["--config_file", str(REPO / "accelerate_configs" / config), "--num_processes", "2"]
    cmd += ["--mixed_precision", "no", "--main_process_port", str(free_port()), *flags]
    cmd += [str(CHILD), *args] if child else args
    with open(log, "ab") as f:
        proc = subprocess.run(cmd, env=_env(), cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    return proc.returncode


def run_one_process(args: list[str], tmp: Path) -> Path:
    proc = subprocess.run(
        [sys.executable, str(CHILD), *args], env=_env(), cwd=REPO, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp


def _script(args: list[str], script: str) -> list[str]:
    return [str(REPO / "recipes" / script)] + args[1:]


@pytest.fixture(scope="module")
def tiny(tiny_pivot_factory):
    return tiny_pivot_factory("siglip")


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """Lazily started runs, each once per module: `runs("name")` -> its output_dir."""
    root = tmp_path_factory.mktemp("zero")
    done = {}

    def dpo(out, batch, *extra):
        return _recipe_args(tiny, out, batch, *extra)

    def get(name: str) -> Path:
        if name in done:
            return done[name]
        out = root / name
        log = root / f"{name}.log"
        checkpoints = ("--save_strategy", "steps", "--save_steps", "2")
        if name == "one_dpo":  # 1 process x 2 rows = 2 processes x 1 row per optimizer step
            run_one_process(dpo(out, 2), out)
        elif name == "one_sft":
            run_one_process(_script(dpo(out, 2), "sft.py"), out)
        elif name == "zero3_dpo":  # recipes/dpo.py itself, as the README launches it
            assert launch("zero3.yaml", dpo(out, 1, *checkpoints), log, child=False) == 0, log.read_text()[-4000:]
        elif name == "zero3_dpo_resumed":
            # The run above, killed after checkpoint-2: only that checkpoint is left, then resumed.
            source = get("zero3_dpo")
            out.mkdir()
            shutil.copytree(source / "checkpoint-2", out / "checkpoint-2")
            assert launch("zero3.yaml", dpo(out, 1, *checkpoints), log, child=False) == 0, log.read_text()[-4000:]
        elif name == "zero3_dpo_precompute":
            args = dpo(out, 1, "--precompute_ref_log_probs", "true")
            assert launch("zero3.yaml", args, log) == 0, log.read_text()[-4000:]
        elif name == "zero2_dpo":
            assert launch("zero2.yaml", dpo(out, 1), log) == 0, log.read_text()[-4000:]
        elif name == "zero3_grpo":
            args = [str(REPO / "recipes" / "grpo.py"), "--config", str(REPO / "recipes" / "grpo_tiny.yaml")]
            args += ["--model_name_or_path", tiny, "--output_dir", str(out), "--per_device_train_batch_size", "2"]
            assert launch("zero3.yaml", args, log) == 0, log.read_text()[-4000:]
        elif name == "zero3_sft":
            assert launch("zero3.yaml", _script(dpo(out, 1), "sft.py"), log) == 0, log.read_text()[-4000:]
        else:  # pragma: no cover
            raise KeyError(name)
        done[name] = out
        return out

    return get


def _report(out: Path) -> dict:
    return json.loads((out / "distributed_check.json").read_text())


def _assert_losses_equal(one: Path, two: Path) -> None:
    expected, got = _losses(one), _losses(two)
    assert sorted(expected) == sorted(got) == list(range(1, STEPS + 1))
    rel = {s: abs(got[s] - expected[s]) / abs(expected[s]) for s in expected}
    print(f"per-step losses 1 process vs {two.name}:", {s: (expected[s], got[s]) for s in expected}, "rel", rel)
    assert max(rel.values()) <= 1e-5, rel
    assert abs(got[STEPS] - got[1]) > 1e-4, "the later steps must have moved the loss"


def _update_norms(out: Path) -> dict:
    state = json.loads((out / "trainer_state.json").read_text())
    return {
        (e["step"], k): v for e in state["log_history"] for k, v in e.items() if k.startswith(("update_norm/", "lr/"))
    }


def _keys(path: Path) -> dict[str, tuple]:
    with safe_open(str(path), "pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


def _assert_like_one_process_save(folder: Path, one: Path) -> None:
    """The tensors of `folder/model.safetensors` have the names, shapes and dtypes of a 1-process save."""
    got, expected = _keys(folder / "model.safetensors"), _keys(one / "model.safetensors")
    assert got == expected, (sorted(set(got) - set(expected))[:5], sorted(set(expected) - set(got))[:5])


def _assert_trained_like_one_process(out: Path, one: Path, tiny: str, atol: float = 1e-5) -> None:
    from pivot_hf import PivotForConditionalGeneration

    start = load_file(str(Path(tiny) / "model.safetensors"))
    after, single = load_file(str(out / "model.safetensors")), load_file(str(one / "model.safetensors"))
    unreached = set(PivotForConditionalGeneration.from_pretrained(tiny).unreached_vision_parameter_names())
    vision = [k for k in start if k.startswith("model.vision_tower.") and k not in unreached]
    assert vision and all(not torch.equal(start[k], after[k]) for k in vision), "vision tower not updated"
    worst = max((after[k] - single[k]).abs().max().item() for k in start)
    print(f"{out.name}: max |w - w_1proc| = {worst:.3g}")
    assert worst < atol


def _assert_groups_kept(report: dict) -> None:
    """The three per-part LR groups, each holding only its part's parameters (read from DeepSpeed's own group lists:
    outside a step ZeRO-3 leaves the optimizer's `param_groups[i]["params"]` empty)."""
    groups = {g["name"]: g for g in report["optimizer_groups"]}
    assert {name: g["lr"] for name, g in groups.items()} == {f"{p}_no_decay": lr for p, lr in LRS.items()}, groups
    for part in LRS:
        group = groups[f"{part}_no_decay"]
        assert group["tensors"] > 0 and group["parts"] == [part], group


def test_zero3_dpo_two_processes_equal_one_process(runs, tiny):
    """Live reference model, `recipes/dpo.py` launched as the README writes it for CPU. Checked: losses, update norms,
    the saved names, the trained tower, and the final model.safetensors through AutoModelForImageTextToText."""
    one, two = runs("one_dpo"), runs("zero3_dpo")
    _assert_losses_equal(one, two)
    # Update norms from the local shards, all-reduced, equal the 1-process values; LRs per part as well.
    expected, got = _update_norms(one), _update_norms(two)
    assert expected.keys() == got.keys() and any(k[1] == "update_norm/vision_tower" for k in got)
    rel = {k: abs(got[k] - v) / abs(v) for k, v in expected.items() if v}
    print("update norms rel", max(rel.values()))
    assert max(rel.values()) <= 1e-4, rel
    _assert_like_one_process_save(two, one)
    _assert_trained_like_one_process(two, one, tiny)

    # The final model.safetensors loads with the Auto class and gives the 1-process run's logits.
    from transformers import AutoModelForImageTextToText

    from distributed_child import _fixed_inputs
    from pivot_hf import PivotProcessor  # importing pivot_hf registers the Pivot classes with the Auto classes

    inputs = _fixed_inputs(PivotProcessor.from_pretrained(one))
    logits = {}
    for name, folder in (("one", one), ("zero3", two)):
        model = AutoModelForImageTextToText.from_pretrained(folder).eval()
        with torch.no_grad():
            logits[name] = model(**inputs).logits.float()
    rel = ((logits["zero3"] - logits["one"]).norm() / logits["one"].norm()).item()
    print(f"logits rel (zero3 save vs 1 process) = {rel:.3g}")
    assert rel <= 1e-5


def test_zero3_mid_run_checkpoint_and_export(runs, tmp_path):
    """checkpoint-2 holds DeepSpeed's shards (resume) and a consolidated model.safetensors with 1-process names;
    recipes/export_encoder.py exports the encoder from the final output and from that checkpoint."""
    one, two = runs("one_dpo"), runs("zero3_dpo")
    checkpoint = two / "checkpoint-2"
    shards = list(checkpoint.glob("global_step2/*optim_states.pt"))
    assert len(shards) == 2, sorted(p.name for p in checkpoint.rglob("*"))
    _assert_like_one_process_save(checkpoint, one)
    from transformers import AutoModel

    for name, source in (("final", two), ("checkpoint", checkpoint)):
        out = tmp_path / name
        cmd = [sys.executable, str(REPO / "recipes" / "export_encoder.py"), "--model_name_or_path", str(source)]
        proc = subprocess.run(
            [*cmd, "--output_dir", str(out)], env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        encoder = AutoModel.from_pretrained(out)
        trained = load_file(str(source / "model.safetensors"))
        for key, value in encoder.state_dict().items():
            full = next(k for k in trained if k.endswith(key) and k.startswith("model.vision_tower."))
            assert torch.equal(value, trained[full]), key


def test_zero3_resume_from_checkpoint_is_bit_equal(runs):
    uninterrupted, resumed = runs("zero3_dpo"), runs("zero3_dpo_resumed")
    a, b = load_file(str(uninterrupted / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    assert _losses(resumed)[STEPS] == _losses(uninterrupted)[STEPS]


def test_zero3_dpo_precomputed_reference_equals_one_process(runs, tiny):
    """`precompute_ref_log_probs` under ZeRO-3 (the partitioned reference scores every row, all ranks in each forward)
    gives the losses of the 1-process live-reference run. This run also reports how the model was held: every
    parameter partitioned, the per-part LR groups each holding its part, the end-of-run check (which reads the shards)
    seeing every trainable tensor change, and the partitioned model's own logits equal to its saved file's."""
    one, two = runs("one_dpo"), runs("zero3_dpo_precompute")
    _assert_losses_equal(one, two)
    report = _report(two)
    assert report["distributed_type"].endswith("DEEPSPEED") and report["world_size"] == 2
    assert report["zero3_partitioned"] == report["parameters"] > 0, "every parameter partitioned over the 2 ranks"
    _assert_groups_kept(report)
    changed = report["tunable_parts_report"]
    assert set(changed) == set(LRS) and all(e["changed"] == e["total"] > 0 for e in changed.values()), changed
    _assert_like_one_process_save(two, one)
    _assert_trained_like_one_process(two, one, tiny)

    from pivot_hf import PivotForConditionalGeneration

    check = load_file(str(two / "distributed_check.safetensors"))
    inputs = {k[len("input.") :]: v for k, v in check.items() if k.startswith("input.")}
    with torch.no_grad():
        logits = PivotForConditionalGeneration.from_pretrained(two).eval()(**inputs).logits.float()
    torch.testing.assert_close(logits, check["logits"], rtol=1e-5, atol=1e-6)


def test_zero2_dpo_equals_one_process(runs, tiny):
    one, two = runs("one_dpo"), runs("zero2_dpo")
    report = _report(two)
    assert report["distributed_type"].endswith("DEEPSPEED") and report["zero3_partitioned"] == 0
    _assert_groups_kept(report)
    _assert_losses_equal(one, two)
    _assert_like_one_process_save(two, one)
    _assert_trained_like_one_process(two, one, tiny)


def test_zero3_sft_equals_one_process(runs, tiny):
    one, two = runs("one_sft"), runs("zero3_sft")
    report = _report(two)
    assert report["zero3_partitioned"] == report["parameters"] > 0
    _assert_groups_kept(report)
    _assert_losses_equal(one, two)
    _assert_like_one_process_save(two, one)
    _assert_trained_like_one_process(two, one, tiny)


def test_saved_names_check_fails_on_the_names_transformers_writes(runs, tmp_path):
    """The name check above is not vacuous: the names transformers' ZeRO-3 save path wrote before the fix
    (`model.language_model.model.*`, `model.vision_tower.vision_model.*`) fail it."""
    one = runs("one_dpo")
    tensors = load_file(str(one / "model.safetensors"))
    renamed = {
        k.replace("model.language_model.", "model.language_model.model.").replace(
            "model.vision_tower.", "model.vision_tower.vision_model."
        ): v
        for k, v in tensors.items()
    }
    from safetensors.torch import save_file

    (tmp_path / "bad").mkdir()
    save_file(renamed, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(AssertionError):
        _assert_like_one_process_save(tmp_path / "bad", one)


def test_zero3_grpo_runs_with_the_tower_training(runs, tiny):
    """GRPO under ZeRO-3 (generation from partitioned weights, 2 completions per prompt): it runs to the end with every
    parameter partitioned, the per-part groups kept, every trainable tensor changed and 1-process tensor names. Its
    losses are not compared with one process: each rank samples its own completions."""
    one, two = runs("one_dpo"), runs("zero3_grpo")
    report = _report(two)
    assert report["zero3_partitioned"] == report["parameters"] > 0
    groups = {g["name"]: g for g in report["optimizer_groups"]}
    assert all(groups[f"{part}_no_decay"]["parts"] == [part] for part in LRS), groups
    changed = report["tunable_parts_report"]
    assert all(e["changed"] == e["total"] > 0 for e in changed.values()), changed
    assert len(report["losses"]) == 2
    _assert_like_one_process_save(two, one)
