"""The prepared GPU check (run by `benchmarks/gpu/run.sh`): PIVOT DPO at the paper's shape under ZeRO-3 and FSDP2,
and the DPO throughput benchmark with and without Liger, reported as JSON + Markdown under `--out`.

    python benchmarks/gpu/check.py --out DIR [--tiny] [--budget-s 540]

Stages (each with its own time limit carved from the budget, each recorded as ok / failed / skipped / timeout):

1. build:  a random Pivot checkpoint (SigLIP2-So400m/16 + Qwen2.5-1.5B, bf16; `--tiny`: the benchmark's tiny
           config), shared with the throughput benchmark.
2. zero3:  3 DPO steps of `recipes/dpo.py` via `accelerate launch`, `accelerate_configs/zero3.yaml`, 1 process, bf16
           (`--tiny` on CPU: 2 processes on DeepSpeed's CPU accelerator, gloo, fp32).
3. fsdp2:  the same with `accelerate_configs/fsdp2.yaml` (`--tiny` on CPU: 2 gloo processes, fp32).
4. throughput: `benchmarks/dpo_throughput.py --setting gpu` (`--tiny` on CPU), 1 repeat.
5. throughput_mmpr: the same on MMPR-like heavy-tailed lengths at 8 pairs per batch (`--lengths mmpr --batch-pairs 8`:
   padding-free pairs against the stock path's padded rows; `--tiny`: 2 pairs per batch).
6. throughput_liger: the same as 4 with `--liger` (Triton kernels: CUDA only).
7. qlora:  3 DPO steps of `recipes/dpo.py` with `use_peft` + `load_in_4bit` (bitsandbytes NF4, LoRA r=16 on every
           linear layer of the LLM, tower and projector trained in full, fp32): the adapter is saved, the LLM holds
           4-bit layers, step-1 loss is ln 2 and the tower changed (CUDA + bitsandbytes only).

Without CUDA, what needs it (Liger) is skipped with the reason printed; everything else runs the same code as on the GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
DATA = ROOT / "tests" / "fixtures" / "mmpr-mini"
STEPS = 3


def _versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "accelerate", "trl", "datasets", "peft", "deepspeed", "liger-kernel"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


class Check:
    def __init__(self, out: Path, work: Path, tiny: bool, budget_s: float):
        import torch

        self.out, self.work, self.tiny = out, work, tiny
        self.cuda = torch.cuda.is_available()
        self.device = torch.cuda.get_device_name() if self.cuda else "cpu"
        self.deadline = time.monotonic() + budget_s
        self.stages: dict[str, dict] = {}
        self.log = open(out / "gpu_check.log", "a", encoding="utf-8")  # noqa: SIM115 - closed in finish()

    # -- plumbing ----------------------------------------------------------------------------------------------------
    def say(self, message: str) -> None:
        print(message, flush=True)
        self.log.write(message + "\n")
        self.log.flush()

    def skip(self, stage: str, reason: str) -> None:
        self.stages[stage] = {"status": "skipped", "reason": reason}
        self.say(f"[{stage}] SKIPPED: {reason}")

    def missing(self, stage: str, package: str, error: ImportError) -> None:
        """A carried package that does not import on the GPU machine fails the check: a skip would report "passed"
        for a run whose ZeRO-3 or Liger half never ran."""
        reason = f"{package} does not import ({error}); run benchmarks/gpu/prepare.sh and carry .whl"
        self.stages[stage] = {"status": "failed", "reason": reason}
        self.say(f"[{stage}] FAILED: {reason}")

    def run(self, stage: str, cmd: list[str], limit_s: float, env: dict | None = None) -> dict:
        # The limits are sized for the GPU; the tiny run on a shared CPU gets 6x as long (its budget is set to match).
        limit_s = limit_s * (6 if self.tiny else 1)
        remaining = self.deadline - time.monotonic()
        limit = max(10.0, min(limit_s, remaining))
        self.say(f"[{stage}] $ {' '.join(cmd)}  (limit {limit:.0f}s)")
        start = time.monotonic()
        full_env = {**os.environ, **(env or {})}
        # A process group of its own, so that a timeout ends the launcher's worker processes too.
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        try:
            output, _ = proc.communicate(timeout=limit)
            rc = proc.returncode
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            status, rc = "timeout", None
        seconds = round(time.monotonic() - start, 1)
        self.log.write(f"----- {stage} output -----\n{output}\n")
        result = {"status": status, "returncode": rc, "seconds": seconds}
        if status != "ok":
            result["output_tail"] = output[-3000:]
        self.stages[stage] = result
        self.say(f"[{stage}] {status.upper()} in {seconds}s")
        return result

    # -- stages ------------------------------------------------------------------------------------------------------
    def build(self) -> str | None:
        key = "gpu-tiny" if self.tiny else "gpu"
        code = (
            "import sys, json; from pathlib import Path; sys.path.insert(0, sys.argv[1]); import dpo_throughput as b; "
            "print(json.dumps(b.build_checkpoint(b.SETTINGS[sys.argv[2]], Path(sys.argv[3]))))"
        )
        result = self.run("build", [sys.executable, "-c", code, str(BENCH), key, str(self.work / "bench")], 240)
        if result["status"] != "ok":
            return None
        return str(self.work / "bench" / "pivot")

    def _recipe_args(self, model: str, output_dir: Path, stage: str) -> list[str]:
        args = {
            "model_name_or_path": model,
            "dataset_name": str(DATA),
            "output_dir": str(output_dir),
            "max_steps": STEPS,
            "per_device_train_batch_size": 2,
            "gradient_checkpointing": "true",
            "logging_steps": 1,
            "report_to": "none",
            "save_strategy": "no",
            "disable_tqdm": "true",
            "max_length": 2048,
            "learning_rate": 1e-5,
            "projector_lr": 2e-5,
            "vision_tower_lr": 2e-6,
            "seed": 0,
        }
        if self.cuda:
            # bf16 compute for both. ZeRO-3 keeps fp32 master weights of bf16 parameters; FSDP2 optimises the
            # parameters in their loaded dtype, where lr-1e-6-sized steps round away in bf16: load them in fp32.
            # QLoRA: the 4-bit LLM computes in the model dtype; the tower and projector train in full without
            # DeepSpeed's fp32 master weights, so they are loaded in fp32 as well.
            args.update(bf16="true", dtype="float32" if stage in ("fsdp2", "qlora") else "bfloat16")
        else:
            args.update(use_cpu="true")
        flat = []
        for key, value in args.items():
            flat += [f"--{key}", str(value)]
        return flat

    def _config(self, source: str, num_processes: int) -> Path:
        config = yaml.safe_load((ROOT / "accelerate_configs" / source).read_text())
        config.update(num_processes=num_processes, main_process_port=0)
        if not self.cuda:
            config.update(use_cpu=True, mixed_precision="no")
        path = self.work / f"launch-{source}"
        path.write_text(yaml.safe_dump(config))
        return path

    def dpo_steps(self, stage: str, source: str, model: str, limit_s: float) -> None:
        if stage == "zero3":
            try:
                import deepspeed  # noqa: F401
            except ImportError as error:
                return self.missing(stage, "deepspeed", error)
        # One GPU: one process. CPU: 2 gloo processes, so that the parameters are really split.
        num_processes = 1 if self.cuda else 2
        config = self._config(source, num_processes)
        report = self.work / f"{stage}.json"
        report.unlink(missing_ok=True)
        output_dir = self.work / f"out-{stage}"
        shutil.rmtree(output_dir, ignore_errors=True)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
        cmd += [str(BENCH / "gpu" / "dpo_steps.py"), "--report", str(report), str(ROOT / "recipes" / "dpo.py")]
        cmd += self._recipe_args(model, output_dir, stage)
        env = {"PIVOT_FSDP_ON_CPU": "1"} if not self.cuda else {}
        result = self.run(stage, cmd, limit_s, env)
        if report.exists():
            result["report"] = json.loads(report.read_text())
        result["checkpoint_saved"] = (output_dir / "model.safetensors").exists() or any(
            output_dir.glob("model-*.safetensors")
        )
        shutil.rmtree(output_dir, ignore_errors=True)  # GiBs at the real shape
        if result["status"] == "ok" and "report" not in result:
            result["status"] = "failed"
            result["reason"] = "the run ended without its report"

    def qlora(self, model: str, limit_s: float) -> None:
        """PIVOT on one small GPU: the LLM loaded in 4 bits (bitsandbytes NF4) with LoRA on every linear layer, the
        vision tower and the projector trained in full, the reference the adapter-disabled policy (no second model)."""
        stage = "qlora"
        if not self.cuda:
            return self.skip(stage, "bitsandbytes 4-bit needs CUDA (the recipe refuses load_in_4bit without it)")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as error:
            return self.missing(stage, "bitsandbytes", error)
        report = self.work / f"{stage}.json"
        report.unlink(missing_ok=True)
        output_dir = self.work / f"out-{stage}"
        shutil.rmtree(output_dir, ignore_errors=True)
        cmd = [sys.executable, str(BENCH / "gpu" / "dpo_steps.py"), "--report", str(report)]
        cmd += [str(ROOT / "recipes" / "dpo.py"), *self._recipe_args(model, output_dir, stage)]
        cmd += ["--use_peft", "true", "--load_in_4bit", "true", "--bnb_4bit_quant_type", "nf4", "--lora_r", "16"]
        cmd += ["--lora_alpha", "32", "--lora_target_modules", "all-linear", "--learning_rate", "1e-4"]
        result = self.run(stage, cmd, limit_s)
        if report.exists():
            result["report"] = json.loads(report.read_text())
        adapter = output_dir / "adapter_model.safetensors"
        result["adapter_saved"] = adapter.exists() and (output_dir / "adapter_config.json").exists()
        shutil.rmtree(output_dir, ignore_errors=True)
        if result["status"] != "ok":
            return
        data = result.get("report") or {}
        losses, changed = data.get("losses") or [], data.get("tensors_changed") or {}
        problems = []
        if not result["adapter_saved"]:
            problems.append("no adapter in output_dir")
        if not data.get("quantized_linear_layers"):
            problems.append("no 4-bit layer in the model")
        if not losses or abs(losses[0] - math.log(2)) > 1e-3:
            problems.append(f"step-1 loss {losses[:1]} is not ln 2")
        if not (changed.get("vision_tower") or [0])[0]:
            problems.append("the vision tower did not change")
        if problems:
            result["status"], result["reason"] = "failed", "; ".join(problems)

    def throughput(self, stage: str, liger: bool, limit_s: float, extra: tuple[str, ...] = ()) -> None:
        if liger:
            if not self.cuda:
                return self.skip(stage, "Liger kernels are Triton GPU kernels: CUDA only")
            try:
                import liger_kernel  # noqa: F401
            except ImportError as error:
                return self.missing(stage, "liger-kernel", error)
        summary = self.work / f"{stage}.json"
        summary.unlink(missing_ok=True)
        cmd = [sys.executable, str(BENCH / "dpo_throughput.py"), "--setting", "gpu", "--repeats", "1"]
        cmd += ["--workdir", str(self.work / "bench"), "--json", str(summary)]
        if self.tiny:
            cmd.append("--tiny")
        if liger:
            cmd.append("--liger")
        cmd += list(extra)
        result = self.run(stage, cmd, limit_s)
        if summary.exists():
            result["summary"] = json.loads(summary.read_text())

    # -- report ------------------------------------------------------------------------------------------------------
    def finish(self) -> int:
        versions = _versions()
        report = {
            "device": self.device,
            "tiny": self.tiny,
            "versions": versions,
            "stages": self.stages,
        }
        (self.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
        (self.out / "gpu_check.md").write_text(markdown(report))
        failed = [name for name, stage in self.stages.items() if stage["status"] not in ("ok", "skipped")]
        self.say(f"gpu check: {'FAILED ' + ', '.join(failed) if failed else 'passed'} ({self.out})")
        self.log.close()
        return 1 if failed else 0


def markdown(report: dict) -> str:
    lines = [f"# PIVOT GPU check on {report['device']}" + (" (tiny code-path run)" if report["tiny"] else ""), ""]
    lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()))
    lines += ["", "| stage | status | seconds | detail |", "| --- | --- | --- | --- |"]
    for name, stage in report["stages"].items():
        detail = stage.get("reason", "")
        run = stage.get("report")
        if run:
            held = (
                f"{len(run['fsdp_units'])} FSDP2 units, {run['dtensor_parameters']}/{run['parameters']} DTensor params"
                if run["fsdp_units"]
                else f"{run['zero3_partitioned_parameters']}/{run['parameters']} ZeRO-3 partitioned params"
            )
            losses = ", ".join(f"{x:.4f}" for x in run["losses"])
            detail = (
                f"{run['distributed_type']} x{run['num_processes']}: {held}; {len(run['optimizer_groups'])} LR groups; "
                f"losses {losses}; train {run['train_wall_seconds']}s; peak {run['peak_cuda_memory_gib']} GiB; "
                f"tensors changed {run['tensors_changed']}"
            )
        summary = stage.get("summary")
        if summary:
            detail = json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)})[:400]
        lines.append(f"| {name} | {stage['status']} | {stage.get('seconds', '')} | {detail} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--work",
        default=None,
        help="scratch folder (checkpoints); default: a fresh temp folder (--tiny), else /tmp/pivot-gpu-check-real",
    )
    parser.add_argument("--tiny", action="store_true", help="the tiny config of the same code path (CPU is fine)")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="wall-clock budget for all stages (540; tiny 2400)"
    )
    parser.add_argument(
        "--stages",
        default="zero3,fsdp2,throughput,throughput_mmpr,throughput_liger,qlora",
        help="comma-separated subset",
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.work:
        work = Path(args.work)
    elif args.tiny:
        # Fresh per run: concurrent tiny runs must not share checkpoints, nor reuse what a killed run left behind.
        work = Path(tempfile.mkdtemp(prefix="pivot-gpu-check-tiny."))
    else:
        # The real shape keeps one folder, so that a rerun on the same (bare, per-session) device machine reuses the
        # 240 s build; pass --work for any other folder.
        work = Path("/tmp/pivot-gpu-check-real")
    work.mkdir(parents=True, exist_ok=True)
    budget = args.budget_s if args.budget_s is not None else (2400 if args.tiny else 540)
    check = Check(out, work, args.tiny, budget)
    check.say(f"device: {check.device}; tiny: {args.tiny}; scratch folder: {work}; versions: {_versions()}")
    model = check.build()
    if model is None:
        return check.finish()
    # Limits at the real shape: build 240 s (cached on a rerun with the same --work), 2 x 100 s, 3 x 90 s; the 540 s
    # budget caps the later stages if the build is slow (rerun them with --stages and the same --work).
    wanted = set(args.stages.split(","))
    if "zero3" in wanted:
        check.dpo_steps("zero3", "zero3.yaml", model, 100)
    if "fsdp2" in wanted:
        check.dpo_steps("fsdp2", "fsdp2.yaml", model, 100)
    if "throughput" in wanted:
        check.throughput("throughput", liger=False, limit_s=90)
    if "throughput_mmpr" in wanted:
        # Tiny (CPU): 2 pairs per batch, the same code path; 8 would run TRL's all-position 151k-vocabulary LM head
        # over 16 long rows for minutes.
        batch = "2" if args.tiny else "8"
        check.throughput(
            "throughput_mmpr", liger=False, limit_s=90, extra=("--lengths", "mmpr", "--batch-pairs", batch)
        )
    if "throughput_liger" in wanted:
        check.throughput("throughput_liger", liger=True, limit_s=90)
    if "qlora" in wanted:
        check.qlora(model, 100)
    return check.finish()


if __name__ == "__main__":
    sys.exit(main())
