"""`make demo`: PIVOT end to end on CPU in minutes, offline, with the real training recipes, over several seeds.

1. Tiny checkpoints (`pivot_hf.testing`): a SigLIP-style encoder and a Qwen2-style LLM whose tokenizer is the Qwen2.5
   tokenizer cut down to the demo's texts (`small_qwen_tokenizer`: same tokens on these texts, a few hundred ids).
2. Procedurally drawn images, one coloured shape each, with checkable answers to two kinds of question:
   "What colour is the <shape>?" (chosen: the right colour, rejected: a wrong one) and "What shape is the <colour>
   object?" (chosen: the right shape, rejected: a wrong one). Both attributes are then what the preference data
   teaches and what the vision-only probe measures. Written in the MMPR layout (meta.json + JSONL + images) for
   Stage 2 and as LLaVA `plain` captions for Stage 1; held-out and probe images are drawn with other seeds.
3. Stage 1 once (`recipes/sft.py`, projector pretraining on captions, composing encoder + LLM; the tower is frozen, so
   the base encoder is the same for every seed). Then, for each seed (its own draw of training images and its own
   trainer seed), Stage 2 on the SAME rows with the same number of steps: DPO = PIVOT (`recipes/dpo.py`) and the SFT
   control (`recipes/sft.py`).
4. Per run: held-out choice accuracy per question kind (log p(chosen) > log p(rejected)), DPO's implicit-reward
   accuracy against the Stage-1 model, and how many vision tensors changed.
5. The deliverable: each encoder (base, and SFT and PIVOT per seed) exported as `recipes/export_encoder.py` does and
   probed as `recipes/eval_vision.py --task prototype` does, on held-out images, class = colour and class = shape;
   mean +- std over seeds, a sentence computed from those numbers, a PNG chart, `results.json` and `results.md`.

The recipes are `recipes/demo/*.yaml`; this module prepares inputs, launches the training scripts, calls the export
and probe functions those scripts call, and reads the outputs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path


COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 30)}
SHAPES = ("circle", "square", "triangle")
ATTRIBUTES = ("colour", "shape")
ENCODERS = ("base", "sft", "pivot")
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


def question_pair(kind: str, shape: str, colour: str, wrong: str) -> dict:
    """The preference pair asking for `kind` ("colour" or "shape") of a `colour` `shape`; `wrong` is the rejected
    value. The question names the other attribute only, so the right answer needs the image."""
    if kind == "colour":
        return {
            "question": f"<image>\nWhat colour is the {shape}?",
            "chosen": f"The {shape} is {colour}.",
            "rejected": f"The {shape} is {wrong}.",
        }
    return {
        "question": f"<image>\nWhat shape is the {colour} object?",
        "chosen": f"It is a {shape}.",
        "rejected": f"It is a {wrong}.",
    }


def demo_texts() -> list[str]:
    """Every question, answer and caption the demo can write, and the Qwen2.5 chat template around them (with the
    processor's system prompt and with the template's own): what the cut-down tokenizer must cover."""
    from transformers import AutoTokenizer

    from .processing_pivot import DEFAULT_SYSTEM_PROMPT
    from .testing import qwen_tokenizer_path

    texts = []
    for shape in SHAPES:
        for colour in COLOURS:
            texts.append(f"a {colour} {shape}")
            texts += question_pair("colour", shape, colour, colour).values()
            texts += question_pair("shape", shape, colour, shape).values()
    texts.append("Describe the image.")
    qwen = AutoTokenizer.from_pretrained(qwen_tokenizer_path())
    turns = [{"role": "user", "content": texts[1]}, {"role": "assistant", "content": texts[2]}]
    for system in ([{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}], []):
        texts.append(qwen.apply_chat_template(system + turns, tokenize=False))
    return texts


def make_shapes_data(root: str | os.PathLike, num_images: int, seed: int) -> dict:
    """Write an MMPR folder: `meta.json` with two sources, `annotations/{colour,shape}.jsonl` (one pair per image
    each), `images/` (`<index>_<colour>_<shape>.png`), plus `captions.json` (LLaVA `plain`). Returns the paths."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    rng = random.Random(seed)
    pairs = {kind: [] for kind in ATTRIBUTES}
    captions = []
    for i in range(num_images):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        name = f"{i:04d}_{colour}_{shape}.png"
        _draw(shape, colour, rng).save(root / "images" / name)
        wrong = {
            "colour": rng.choice([c for c in COLOURS if c != colour]),
            "shape": rng.choice([s for s in SHAPES if s != shape]),
        }
        for kind in ATTRIBUTES:
            pairs[kind].append({"image": name, **question_pair(kind, shape, colour, wrong[kind])})
        conversation = [
            {"from": "human", "value": "<image>\nDescribe the image."},
            {"from": "gpt", "value": f"a {colour} {shape}"},
        ]
        captions.append({"id": f"{i:04d}", "image": name, "conversations": conversation})
    meta = {}
    for kind, rows in pairs.items():
        with open(root / "annotations" / f"{kind}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p) + "\n" for p in rows)
        meta[kind] = {
            "root": "images",
            "annotation": f"annotations/{kind}.jsonl",
            "data_augment": False,
            "repeat_time": 1,
            "length": len(rows),
        }
    (root / "meta.json").write_text(json.dumps(meta, indent=2))
    (root / "captions.json").write_text(json.dumps(captions))
    return {
        "mmpr": str(root),
        "captions": str(root / "captions.json"),
        "images": str(root / "images"),
        **{kind: str(root / "annotations" / f"{kind}.jsonl") for kind in ATTRIBUTES},
    }


def make_probe_data(root: str | os.PathLike, num_train: int, num_test: int, seed: int) -> dict:
    """ImageFolder trees `by_<attribute>/{train,test}/<class>/<file>.png` of the same drawn images, labelled by
    colour and by shape: the prototype probe's class means come from train, its accuracy from test.

    Each split holds every colour and every shape (the probe refuses a test class without train images): where the
    random draw missed one, as small counts can, an image of each missing class is added (from its own random
    stream, so the draw itself does not change)."""
    root = Path(root)
    rng = random.Random(seed)
    top_up = random.Random(seed + 1)

    def save(image, split: str, i: int, shape: str, colour: str) -> None:
        for attribute, label in (("colour", colour), ("shape", shape)):
            folder = root / f"by_{attribute}" / split / label
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i:04d}_{colour}_{shape}.png")

    for split, count in (("train", num_train), ("test", num_test)):
        seen = set()
        for i in range(count):
            shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
            save(_draw(shape, colour, rng), split, i, shape, colour)
            seen |= {shape, colour}
        missing_colours = [c for c in COLOURS if c not in seen]
        missing_shapes = [s for s in SHAPES if s not in seen]
        for j in range(max(len(missing_colours), len(missing_shapes))):
            colour = missing_colours[j] if j < len(missing_colours) else top_up.choice(list(COLOURS))
            shape = missing_shapes[j] if j < len(missing_shapes) else top_up.choice(SHAPES)
            save(_draw(shape, colour, top_up), split, count + j, shape, colour)
    return {attribute: str(root / f"by_{attribute}") for attribute in ATTRIBUTES}


# ----------------------------------------------------------------------------------------------------- launching
def _command(script: str, recipe: str, overrides: dict, num_processes: int) -> list[str]:
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
    return cmd


def _env() -> dict:
    env = dict(os.environ)
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.setdefault(key, "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("WANDB_DISABLED", "true")
    # One thread per process: on a small shared CPU, more threads than cores is several times slower.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_jobs(jobs: list[tuple[str, list[str], Path]], parallel: int) -> dict[str, float]:
    """Run `(name, command, log)` jobs, at most `parallel` at a time; return each one's wall seconds. A failed job
    stops the demo with its log's tail."""
    pending, running, seconds = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            name, cmd, log_path = pending.pop(0)
            print(f"$ {' '.join(cmd[1:])}", flush=True)
            log = open(log_path, "w", encoding="utf-8")
            proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
            running[name] = (proc, log, log_path, time.time())
        time.sleep(0.2)
        for name, (proc, log, log_path, start) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            if proc.returncode != 0:
                for other, *_ in running.values():
                    other.kill()
                tail = log_path.read_text(errors="replace")[-3000:]
                raise SystemExit(f"{name} failed (log: {log_path}):\n{tail}")
            seconds[name] = time.time() - start
    return seconds


# ---------------------------------------------------------------------------------------------------- evaluation
def _sequence_logps(model, batch):
    import torch

    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    with torch.no_grad():
        logits = model(**inputs).logits.float()
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logps * batch["completion_mask"][:, 1:]).sum(-1)


def evaluate_choices(
    checkpoint: str, pairs: str, image_folder: str, reference: str | None = None, batch_size: int = 16
) -> dict:
    """Held-out accuracy of log p(chosen) > log p(rejected) on an MMPR-style JSONL of `pairs`; with `reference`, also
    DPO's implicit-reward accuracy ((policy margin - reference margin) > 0)."""
    import torch
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    from .data import load_pivot_dataset
    from .modeling_pivot import PivotForConditionalGeneration
    from .processing_pivot import PivotProcessor

    processor = PivotProcessor.from_pretrained(checkpoint)
    dataset, _ = load_pivot_dataset(pairs, "preference", num_samples=-1, image_folder=image_folder)
    collator = DataCollatorForVisionPreference(processor=processor)
    models = {"policy": PivotForConditionalGeneration.from_pretrained(checkpoint, use_kernels=False).eval()}
    if reference:
        models["ref"] = PivotForConditionalGeneration.from_pretrained(reference, use_kernels=False).eval()
    margins = {name: [] for name in models}
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        for name, model in models.items():
            chosen, rejected = _sequence_logps(model, batch).chunk(2)
            margins[name].append(chosen - rejected)
    policy = torch.cat(margins["policy"])
    result = {"choice_accuracy": (policy > 0).float().mean().item(), "logp_margin": policy.mean().item()}
    if reference:
        result["reward_accuracy_vs_ref"] = ((policy - torch.cat(margins["ref"])) > 0).float().mean().item()
    return result


def vision_change(before: str, after: str) -> tuple[int, int]:
    """(changed, reachable) vision-tower tensors between two checkpoints."""
    import torch

    from .modeling_pivot import PivotForConditionalGeneration

    a = PivotForConditionalGeneration.from_pretrained(before, use_kernels=False)
    b = PivotForConditionalGeneration.from_pretrained(after, use_kernels=False)
    unreached = set(a.unreached_vision_parameter_names())
    names = [n for n, _ in a.named_parameters() if n.startswith("model.vision_tower.") and n not in unreached]
    changed = sum(not torch.equal(a.get_parameter(n), b.get_parameter(n)) for n in names)
    return changed, len(names)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def compare(a: list[float], b: list[float], resolution: float) -> tuple[str, float]:
    """("above" | "below" | "level with", mean(a) - mean(b)). A difference counts only when it exceeds two standard
    errors of the difference of means (the seed-to-seed spread; a single value has none) and one test image
    (`resolution`): with a handful of seeds, smaller gaps are what reseeding alone produces."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    diff = ma - mb
    standard_error = math.sqrt(sa**2 / len(a) + sb**2 / len(b))
    if abs(diff) > max(2 * standard_error, resolution - 1e-9):
        return ("above" if diff > 0 else "below"), diff
    return "level with", diff


def verdict(probe: dict[str, dict[str, list[float]]], num_test: int, num_seeds: int) -> str:
    """One sentence, computed from `probe[attribute][encoder]` (per-seed top-1 lists), saying where PIVOT's encoder
    stands against the base and the SFT encoders on each attribute."""
    clauses = []
    for attribute in ATTRIBUTES:
        parts = []
        for other in ("base", "sft"):
            word, diff = compare(probe[attribute]["pivot"], probe[attribute][other], 1 / num_test)
            parts.append(f"{word} {'the base encoder' if other == 'base' else 'SFT'} ({diff:+.3f})")
        clauses.append(f"on {attribute} {parts[0]} and {parts[1]}")
    return (
        f"At this toy scale ({num_seeds} seeds, {num_test} probe test images), the PIVOT-trained encoder probes "
        f"{clauses[0]}, and {clauses[1]}, where 'level with' means the gap is within two standard errors of the "
        "seed-to-seed spread (or under one test image), so this demo cannot tell those apart."
    )


def probe_chart(probe: dict, chance: dict, path: Path) -> str:
    """Bars (mean top-1 per encoder and attribute), error bars (std over seeds), dots (each seed), chance lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    width = 0.26
    colours = {"base": "#9e9e9e", "sft": "#4c78a8", "pivot": "#e45756"}
    for j, encoder in enumerate(ENCODERS):
        for i, attribute in enumerate(ATTRIBUTES):
            values = probe[attribute][encoder]
            mean, std = mean_std(values)
            x = i + (j - 1) * width
            ax.bar(
                x, mean, width * 0.9, yerr=std, capsize=3, color=colours[encoder], label=encoder if i == 0 else None
            )
            ax.scatter([x] * len(values), values, s=10, color="black", zorder=3)
    for i, attribute in enumerate(ATTRIBUTES):
        ax.hlines(chance[attribute], i - 1.5 * width, i + 1.5 * width, colors="black", linestyles="dashed", lw=0.8)
    ax.set_xticks(range(len(ATTRIBUTES)), [f"class = {a}" for a in ATTRIBUTES])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("prototype-probe top-1 (held-out)")
    ax.set_title("Exported encoders, vision only: mean ± std over seeds; dots = seeds; dashes = chance", fontsize=8)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def _pm(values: list[float], digits: int = 3) -> str:
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


# ---------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_output", help="Everything the demo writes goes here.")
    parser.add_argument("--seeds", type=int, default=3, help="Stage-2 seeds (each: its own rows and trainer seed).")
    parser.add_argument("--train_images", type=int, default=96, help="Images per training set (2 questions each).")
    parser.add_argument("--eval_images", type=int, default=48, help="Held-out images for the choice accuracy.")
    parser.add_argument(
        "--probe_images",
        type=int,
        default=120,
        help="Probe images per split (train and test; at least one of each colour and shape).",
    )
    parser.add_argument("--stage1_steps", type=int, default=80, help="Projector-pretraining steps (once).")
    parser.add_argument("--stage2_steps", type=int, default=96, help="Steps of DPO and of the SFT control (the same).")
    parser.add_argument("--jobs", type=int, default=2, help="Training runs at once (one CPU thread each).")
    parser.add_argument("--num_processes", type=int, default=1, help=">1: accelerate launch, one gloo process each.")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    out = Path(args.output_dir).resolve()
    for previous in ("stage1", "stage2", "encoders", "probe", "data", "parts", "logs"):
        # A re-run starts from scratch (the trainers would otherwise resume from an earlier run's checkpoints).
        shutil.rmtree(out / previous, ignore_errors=True)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    start, cpu_start = time.time(), os.times()
    seeds = list(range(args.seeds))

    from .testing import build_tiny_llm, build_tiny_vision, small_qwen_tokenizer

    print("== tiny checkpoints and the shapes data (colour and shape questions)", flush=True)
    tokenizer = small_qwen_tokenizer(out / "parts" / "tokenizer", demo_texts())
    vision = build_tiny_vision(out / "parts" / "vision", "siglip", hidden_size=64, num_layers=3)
    text = build_tiny_llm(out / "parts" / "llm", "qwen2", hidden_size=64, tokenizer_path=tokenizer)
    captions = make_shapes_data(out / "data" / "stage1", args.train_images, seed=1000)
    train = {s: make_shapes_data(out / "data" / f"train_seed{s}", args.train_images, seed=s) for s in seeds}
    held_out = make_shapes_data(out / "data" / "held_out", args.eval_images, seed=2000)
    probe_data = make_probe_data(out / "data" / "probe", args.probe_images, args.probe_images, seed=3000)

    stage1 = out / "stage1"
    timings = {}
    print("== Stage 1: projector pretraining (plain captions), composing encoder + LLM", flush=True)
    overrides = {
        "vision_model_name_or_path": vision,
        "text_model_name_or_path": text,
        "dataset_name": captions["captions"],
        "image_folder": captions["images"],
        "output_dir": stage1,
        "max_steps": args.stage1_steps,
    }
    cmd = _command("sft.py", "stage1_projector.yaml", overrides, args.num_processes)
    timings |= run_jobs([("stage1", cmd, logs / "stage1.log")], 1)

    print(f"== Stage 2 for seeds {seeds}: DPO (PIVOT) and the SFT control, same rows and steps", flush=True)
    runs = {}  # name -> (method, seed, folder)
    jobs = []
    for s in seeds:
        for method, script, recipe in (("pivot", "dpo.py", "dpo.yaml"), ("sft", "sft.py", "sft.yaml")):
            folder = out / "stage2" / f"{method}_seed{s}"
            overrides = {
                "model_name_or_path": stage1,
                "dataset_name": train[s]["mmpr"],
                "max_steps": args.stage2_steps,
                "seed": s,
                "output_dir": folder,
            }
            runs[f"{method}_seed{s}"] = (method, s, folder)
            jobs.append((f"{method}_seed{s}", _command(script, recipe, overrides, args.num_processes), logs))
    jobs = [(name, cmd, log / f"{name}.log") for name, cmd, log in jobs]
    timings |= run_jobs(jobs, max(1, args.jobs // args.num_processes))

    print("== the MLLMs on held-out questions", flush=True)
    mllm = {}
    for name, (method, s, folder) in {"stage1": ("stage1", None, stage1), **runs}.items():
        summary = json.loads((folder / "pivot_run.json").read_text())
        entry = {
            "method": method,
            "seed": s,
            "steps": summary["global_step"],
            "first_loss": summary["first_log"].get("loss"),
            "last_loss": summary["last_log"].get("loss"),
            "train_reward_accuracy": summary["last_log"].get("rewards/accuracies"),
            "seconds": round(timings[name], 1),
        }
        reference = None if method == "stage1" else str(stage1)
        for kind in ATTRIBUTES:
            result = evaluate_choices(str(folder), held_out[kind], held_out["images"], reference=reference)
            entry[f"{kind}_choice_accuracy"] = result["choice_accuracy"]
            if reference:
                entry[f"{kind}_reward_accuracy_vs_ref"] = result["reward_accuracy_vs_ref"]
        if method != "stage1":
            changed, total = vision_change(str(stage1), str(folder))
            entry["vision_changed"] = [changed, total]
        mllm[name] = entry

    print("== export the encoders (base = Stage 1, SFT and PIVOT per seed) and probe them, vision only", flush=True)
    from .evaluation.runner import EvalVisionArguments
    from .evaluation.runner import run as run_eval_vision
    from .export import ExportEncoderArguments, run_export

    # The tiny tower has no Hub id, which the export would warn about once per encoder.
    logging.getLogger("pivot_hf.export.encoder").setLevel(logging.ERROR)
    encoders = {"base": out / "encoders" / "base"}
    encoders |= {name: out / "encoders" / name for name in runs}
    for name, folder in encoders.items():
        source = stage1 if name == "base" else runs[name][2]
        run_export(ExportEncoderArguments(model_name_or_path=str(source), output_dir=str(folder)))
    probe_runs = {}
    for attribute in ATTRIBUTES:
        eval_args = EvalVisionArguments(
            task="prototype",
            model_name_or_path=[str(p) for p in encoders.values()],
            model_labels=list(encoders),
            dataset_name=probe_data[attribute],
            output_dir=str(out / "probe" / attribute),
            no_cache=True,
            device="cpu",
        )
        run_eval_vision(eval_args)
        report = json.loads((out / "probe" / attribute / "results.json").read_text())
        probe_runs[attribute] = {r["label"]: r["metrics"]["top1"] for r in report["runs"]}
    probe = {
        attribute: {
            "base": [probe_runs[attribute]["base"]],
            **{m: [probe_runs[attribute][f"{m}_seed{s}"] for s in seeds] for m in ("sft", "pivot")},
        }
        for attribute in ATTRIBUTES
    }
    chance = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES)}
    sentence = verdict(probe, args.probe_images, len(seeds))
    chart = probe_chart(probe, chance, out / "probe.png")

    # ------------------------------------------------------------------------------------------------ the report
    def column(method: str, key: str) -> list[float]:
        return [e[key] for e in mllm.values() if e["method"] == method and e.get(key) is not None]

    rows = []
    for method, label in (("stage1", "stage1"), ("sft", "sft"), ("pivot", "pivot")):
        first, last = column(method, "first_loss"), column(method, "last_loss")
        row = {
            "run": label,
            "seeds": 1 if method == "stage1" else len(seeds),
            "loss first -> last": f"{mean_std(first)[0]:.3f} -> {mean_std(last)[0]:.3f}" if first else "-",
        }
        for kind in ATTRIBUTES:
            row[f"held-out acc, {kind} Q"] = _pm(column(method, f"{kind}_choice_accuracy"), 2)
        for kind in ATTRIBUTES:
            values = column(method, f"{kind}_reward_accuracy_vs_ref")
            row[f"rew.acc vs ref, {kind} Q"] = _pm(values, 2) if values else "-"
        changed = [e["vision_changed"] for e in mllm.values() if e["method"] == method and "vision_changed" in e]
        low, high = (min(c for c, _ in changed), max(c for c, _ in changed)) if changed else (0, 0)
        row["vision changed"] = (
            "frozen" if not changed else f"{low}/{changed[0][1]}" if low == high else (f"{low}-{high}/{changed[0][1]}")
        )
        rows.append(row)
    probe_rows = []
    for encoder in ENCODERS:
        row = {"encoder": encoder, "seeds": len(probe["colour"][encoder])}
        for attribute in ATTRIBUTES:
            row[f"class = {attribute}"] = _pm(probe[attribute][encoder])
        for attribute in ATTRIBUTES:
            row[f"per seed, {attribute}"] = " ".join(f"{v:.3f}" for v in probe[attribute][encoder])
        probe_rows.append(row)

    wall = time.time() - start
    cpu_end = os.times()
    cpu = {
        "user": round(cpu_end.user - cpu_start.user + cpu_end.children_user - cpu_start.children_user, 1),
        "system": round(cpu_end.system - cpu_start.system + cpu_end.children_system - cpu_start.children_system, 1),
    }
    title = (
        f"PIVOT demo: {len(seeds)} seeds x (DPO, SFT), {args.train_images} training images x 2 questions per seed, "
        f"CPU, {wall:.0f} s wall, {cpu['user']:.0f} s user CPU"
    )
    probe_title = (
        f"vision-only prototype probe of the exported encoders, {args.probe_images} held-out test images per attribute"
        f" (top-1, mean ± std over seeds; chance: colour {chance['colour']:.2f}, shape {chance['shape']:.2f}; base: "
        "Stage 1 freezes the tower, so one encoder serves every seed)"
    )
    table = "\n".join([_text_table(rows), "", probe_title + ":", _text_table(probe_rows)])
    print(f"\n{title}\n{table}\n\n{sentence}")
    print(
        "held-out acc: share of held-out questions (colour / shape) where the model gives the right answer a higher "
        "log-probability than the wrong one (chance 0.5).\nrew.acc vs ref: DPO's implicit reward accuracy against "
        "the Stage-1 model."
    )
    markdown = "\n".join(
        [
            "# PIVOT demo",
            "",
            title + ".",
            "",
            _markdown_table(rows),
            "",
            probe_title + ":",
            "",
            _markdown_table(probe_rows),
            "",
            sentence,
            "",
            "![probe](probe.png)",
            "",
        ]
    )
    (out / "results.md").write_text(markdown, encoding="utf-8")
    summary = {
        "settings": vars(args),
        "mllm": mllm,
        "probe": probe,
        "chance": chance,
        "sentence": sentence,
        "seconds": round(wall, 1),
        "cpu_seconds": cpu,
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "table": table,
        "chart": chart,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"outputs: {out} (results.md, results.json, probe.png; stage1/ stage2/ encoders/ probe/ logs/)")
    return summary


def _text_table(rows: list[dict]) -> str:
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    lines.append("-" * len(lines[0]))
    lines += ["  ".join(str(r[k]).ljust(w) for k, w in zip(keys, widths)) for r in rows]
    return "\n".join(lines)


def _markdown_table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
