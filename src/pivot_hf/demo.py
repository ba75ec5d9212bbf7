"""`make demo`: PIVOT end to end on CPU in minutes, offline, with the real recipe scripts.

1. Tiny checkpoints (`pivot_hf.testing`): a SigLIP-style encoder and a Qwen2-style LLM with the real Qwen2.5 tokenizer.
2. A procedurally drawn data set with checkable answers: one coloured shape per image, "What colour is the <shape>?";
   chosen = the right colour, rejected = a wrong one. Written in the MMPR layout (meta.json + JSONL + images) for
   Stage 2, and as LLaVA `plain` captions for Stage 1; a held-out MMPR folder is drawn with another seed.
3. Stage 1 (`recipes/sft.py`, projector pretraining on captions, composing encoder + LLM), then Stage 2 on the SAME rows
   with the same number of steps: DPO = PIVOT (`recipes/dpo.py`) and the SFT control (`recipes/sft.py`).
4. A results table: training loss, DPO reward accuracy / margin, held-out choice accuracy (log p(chosen) >
   log p(rejected)), implicit-reward accuracy against the Stage-1 reference, and whether the vision weights changed.
5. The deliverable: each encoder (Stage 1 = base, SFT, PIVOT) exported with `recipes/export_encoder.py` and probed
   with `recipes/eval_vision.py --task prototype` on the held-out shapes (class = colour, then class = shape).

The recipes are `recipes/demo/*.yaml`; this module only prepares inputs, launches the scripts and reads their outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path


COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 30)}
SHAPES = ("circle", "square", "triangle")
REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------------------ data
def _draw(shape: str, colour: str, rng: random.Random, size: int = 64):
    from PIL import Image, ImageDraw

    background = tuple(rng.randint(200, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def make_shapes_data(root: str | os.PathLike, num_rows: int, seed: int) -> dict:
    """Write an MMPR folder (`meta.json`, `annotations/shapes.jsonl`, `images/`) plus `captions.json` (LLaVA)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    rng = random.Random(seed)
    pairs, captions = [], []
    for i in range(num_rows):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        wrong = rng.choice([c for c in COLOURS if c != colour])
        name = f"{i:04d}_{colour}_{shape}.png"
        _draw(shape, colour, rng).save(root / "images" / name)
        pairs.append(
            {
                "image": name,
                "question": f"<image>\nWhat colour is the {shape}?",
                "chosen": f"The {shape} is {colour}.",
                "rejected": f"The {shape} is {wrong}.",
            }
        )
        captions.append(
            {
                "id": f"{i:04d}",
                "image": name,
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the image."},
                    {"from": "gpt", "value": f"a {colour} {shape}"},
                ],
            }
        )
    with open(root / "annotations" / "shapes.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    meta = {
        "shapes": {
            "root": "images",
            "annotation": "annotations/shapes.jsonl",
            "data_augment": False,
            "repeat_time": 1,
            "length": len(pairs),
        }
    }
    (root / "meta.json").write_text(json.dumps(meta, indent=2))
    (root / "captions.json").write_text(json.dumps(captions))
    return {"mmpr": str(root), "captions": str(root / "captions.json"), "images": str(root / "images")}


# ----------------------------------------------------------------------------------------------------- launching
def _run(script: str, recipe: str, overrides: dict, log_path: Path, num_processes: int) -> float:
    env = dict(os.environ)
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.setdefault(key, "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("WANDB_DISABLED", "true")
    # One thread per process: on a small shared CPU, more threads than cores is several times slower.
    env.setdefault("OMP_NUM_THREADS", "1")
    if num_processes > 1:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes"]
        launcher += [str(num_processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        launcher += ["--main_process_port", "0"]
        overrides = {**overrides, "use_cpu": "true"}
    else:
        launcher = [sys.executable]
    cmd = launcher + [str(REPO / "recipes" / script), "--config", str(REPO / "recipes" / "demo" / recipe)]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    print(f"$ {' '.join(cmd[len(launcher) - 1 :]) if num_processes == 1 else ' '.join(cmd)}", flush=True)
    start = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{script} --config recipes/demo/{recipe} failed (log: {log_path}):\n{tail}")
    return time.time() - start


# ---------------------------------------------------------------------------------------------------- evaluation
def _sequence_logps(model, batch):
    import torch

    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    with torch.no_grad():
        logits = model(**inputs).logits.float()
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logps * batch["completion_mask"][:, 1:]).sum(-1)


def evaluate_choices(checkpoint: str, eval_dir: str, reference: str | None = None, batch_size: int = 8) -> dict:
    """Held-out accuracy of log p(chosen) > log p(rejected); with `reference`, also DPO's implicit-reward accuracy."""
    import torch
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from .data import load_pivot_dataset
    from .modeling_pivot import PivotForConditionalGeneration
    from .processing_pivot import PivotProcessor

    processor = PivotProcessor.from_pretrained(checkpoint)
    dataset, _ = load_pivot_dataset(eval_dir, "preference", num_samples=-1)
    collator = DataCollatorForVisionPreference(processor=processor)
    models = {"policy": PivotForConditionalGeneration.from_pretrained(checkpoint).eval()}
    if reference:
        models["ref"] = PivotForConditionalGeneration.from_pretrained(reference).eval()
    margins = {name: [] for name in models}
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        for name, model in models.items():
            chosen, rejected = _sequence_logps(model, batch).chunk(2)
            margins[name].append(chosen - rejected)
    policy = torch.cat(margins["policy"])
    result = {"choice_accuracy": (policy > 0).float().mean().item(), "logp_margin": policy.mean().item()}
    if reference:
        implicit = policy - torch.cat(margins["ref"])
        result["reward_accuracy_vs_ref"] = (implicit > 0).float().mean().item()
    return result


def vision_change(before: str, after: str) -> tuple[int, int]:
    """(changed, reachable) vision-tower tensors between two checkpoints."""
    import torch

    from .modeling_pivot import PivotForConditionalGeneration

    a = PivotForConditionalGeneration.from_pretrained(before)
    b = PivotForConditionalGeneration.from_pretrained(after)
    unreached = set(a.unreached_vision_parameter_names())
    names = [n for n, _ in a.named_parameters() if n.startswith("model.vision_tower.") and n not in unreached]
    changed = sum(not torch.equal(a.get_parameter(n), b.get_parameter(n)) for n in names)
    return changed, len(names)


def _run_script(script: str, args: list[str], log_path: Path) -> None:
    """A recipe script that takes plain flags (export, evaluation)."""
    cmd = [sys.executable, str(REPO / "recipes" / script), *args]
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{script} failed (log: {log_path}):\n{log_path.read_text(errors='replace')[-3000:]}")


def _image_folder_by(images: Path, target: Path, attribute: str) -> Path:
    """ImageFolder layout (`<class>/<file>.png`) of the held-out shapes, the class being the image's `colour` or
    `shape` (both are in each file name: `<index>_<colour>_<shape>.png`)."""
    position = {"colour": 1, "shape": 2}[attribute]
    for path in sorted(images.glob("*.png")):
        label = path.stem.split("_")[position]
        (target / label).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target / label / path.name)
    return target


def _probe_lines(probe: dict) -> str:
    attributes = list(probe)
    lines = [f"  {'encoder':<10}" + "".join(f"{'class = ' + a:>18}" for a in attributes)]
    for i, run in enumerate(probe[attributes[0]]["runs"]):
        values = [probe[a]["runs"][i]["metrics"][probe[a]["primary_metric"]] for a in attributes]
        lines.append(f"  {run['label']:<10}" + "".join(f"{v:>18.3f}" for v in values))
    return "\n".join(lines)


def _run_summary(output_dir: Path) -> dict:
    return json.loads((output_dir / "pivot_run.json").read_text())


# ---------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_output", help="Everything the demo writes goes here.")
    parser.add_argument("--train_rows", type=int, default=96, help="Shape images for training (Stage 1 and 2).")
    parser.add_argument("--eval_rows", type=int, default=48, help="Held-out shape images (another seed).")
    parser.add_argument("--stage1_steps", type=int, default=40, help="Projector-pretraining steps.")
    parser.add_argument("--stage2_steps", type=int, default=30, help="Steps of DPO and of the SFT control (the same).")
    parser.add_argument("--num_processes", type=int, default=1, help=">1: accelerate launch, one gloo process each.")
    args = parser.parse_args(argv)
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    out = Path(args.output_dir).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    start = time.time()

    from .testing import build_tiny_llm, build_tiny_vision

    print("== tiny checkpoints and the shapes data", flush=True)
    vision = build_tiny_vision(out / "parts" / "vision", "siglip", hidden_size=64, num_layers=3)
    text = build_tiny_llm(out / "parts" / "llm", "qwen2", hidden_size=64)
    train = make_shapes_data(out / "data" / "shapes_train", args.train_rows, seed=0)
    held_out = make_shapes_data(out / "data" / "shapes_eval", args.eval_rows, seed=1)

    stage1, dpo, sft = out / "stage1", out / "dpo", out / "sft"
    for previous in (stage1, dpo, sft, out / "encoders", out / "probe"):
        # A re-run starts from scratch (the trainers would otherwise resume from an earlier run's checkpoints).
        shutil.rmtree(previous, ignore_errors=True)
    timings = {}
    print("== Stage 1: projector pretraining (plain captions), composing encoder + LLM", flush=True)
    timings["stage1"] = _run(
        "sft.py",
        "stage1_projector.yaml",
        {
            "vision_model_name_or_path": vision,
            "text_model_name_or_path": text,
            "dataset_name": train["captions"],
            "image_folder": train["images"],
            "output_dir": stage1,
            "max_steps": args.stage1_steps,
        },
        logs / "stage1.log",
        args.num_processes,
    )
    common = {"model_name_or_path": stage1, "dataset_name": train["mmpr"], "max_steps": args.stage2_steps}
    print("== Stage 2: DPO (PIVOT), vision tower training", flush=True)
    timings["dpo"] = _run("dpo.py", "dpo.yaml", {**common, "output_dir": dpo}, logs / "dpo.log", args.num_processes)
    print("== Stage 2 control: SFT on the chosen answers of the same rows, same steps", flush=True)
    timings["sft"] = _run("sft.py", "sft.yaml", {**common, "output_dir": sft}, logs / "sft.log", args.num_processes)

    print("== evaluation on held-out shapes", flush=True)
    results = {}
    for name, folder in (("stage1", stage1), ("dpo", dpo), ("sft", sft)):
        run = _run_summary(folder)
        entry = {
            "steps": run["global_step"],
            "first_loss": run["first_log"].get("loss"),
            "last_loss": run["last_log"].get("loss"),
            "train_reward_accuracy": run["last_log"].get("rewards/accuracies"),
            "train_reward_margin": run["last_log"].get("rewards/margins"),
            "seconds": round(timings[name], 1),
        }
        entry.update(
            evaluate_choices(str(folder), held_out["mmpr"], reference=None if name == "stage1" else str(stage1))
        )
        changed, total = vision_change(str(stage1), str(folder)) if name != "stage1" else (0, 0)
        entry["vision_changed"] = f"{changed}/{total}" if name != "stage1" else "frozen"
        results[name] = entry

    print("== export the encoders (base = Stage 1, SFT, PIVOT) and probe them on held-out shapes", flush=True)
    encoders = {}
    for name, folder in (("base", stage1), ("sft", sft), ("pivot", dpo)):
        encoders[name] = out / "encoders" / name
        _run_script(
            "export_encoder.py",
            ["--model_name_or_path", str(folder), "--output_dir", str(encoders[name])],
            logs / f"export_{name}.log",
        )
    probe = {}
    for attribute in ("colour", "shape"):
        folder = _image_folder_by(Path(held_out["images"]), out / "data" / f"shapes_eval_by_{attribute}", attribute)
        _run_script(
            "eval_vision.py",
            ["--task", "prototype", "--model_name_or_path", *map(str, encoders.values())]
            + [
                "--model_labels",
                *encoders,
                "--dataset_name",
                str(folder),
                "--output_dir",
                str(out / "probe" / attribute),
            ],
            logs / f"probe_{attribute}.log",
        )
        probe[attribute] = json.loads((out / "probe" / attribute / "results.json").read_text())

    def fmt(value, spec=".3f"):
        return "-" if value is None else format(value, spec)

    header = (
        f"{'run':<8}{'steps':>6}{'loss first->last':>20}{'train rew.acc':>14}{'train margin':>13}"
        f"{'held-out acc':>13}{'rew.acc vs ref':>15}{'vision changed':>16}"
    )
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        loss = f"{fmt(r['first_loss'])} -> {fmt(r['last_loss'])}"
        lines.append(
            f"{name:<8}{r['steps']:>6}{loss:>20}{fmt(r['train_reward_accuracy'], '.2f'):>14}"
            f"{fmt(r['train_reward_margin']):>13}{fmt(r['choice_accuracy'], '.2f'):>13}"
            f"{fmt(r.get('reward_accuracy_vs_ref'), '.2f'):>15}{r['vision_changed']:>16}"
        )
    lines.append("")
    lines.append("vision-only prototype probe of the exported encoders on held-out shapes (top-1):")
    lines.append(_probe_lines(probe))
    table = "\n".join(lines)
    total_time = time.time() - start
    print(
        f"\nPIVOT demo ({args.train_rows} training / {args.eval_rows} held-out shape images, CPU, {total_time:.0f} s)"
    )
    print(table)
    print(
        "held-out acc: share of held-out questions where the model gives the right colour a higher log-probability "
        "than the wrong one (chance 0.5).\nrew.acc vs ref: DPO's implicit reward accuracy against the Stage-1 model."
    )
    summary = {"results": results, "probe": probe, "seconds": total_time, "table": table}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"outputs: {out} (checkpoints stage1/ dpo/ sft/, encoders/, probe/, logs/, results.json)")
    return summary


if __name__ == "__main__":
    main()
