"""The paper's recipe matrix, written from one table of facts: `python recipes/paper/generate.py [--check]`.

Every YAML under `recipes/paper/` is generated here, so that the ~150 recipes
of Table 1, Fig. 2/3, Fig. 4/5 + Table M, Tables E/F/J/K and Fig. B cannot drift apart: a hyperparameter is changed
once, below, and the files are rewritten. `--check` exits non-zero when a file on disk differs from what this script
would write (the test suite runs it). Values are the official recipe's (`official_recipe.md`: global batch 256 on 8
GPUs, cosine, warmup 0.03, weight decay 0, bf16, max length 2048).

Layout (`<pair>` = `<encoder>+<llm>`, e.g. `siglip2-so400m+qwen2.5-1.5b`):
    stages/<pair>/1a_projector.yaml      Stage 1a  recipes/sft.py  projector pretraining, LCS-558K
    stages/<pair>/1b_finetune.yaml       Stage 1b  recipes/sft.py  full finetuning, OneVision single-image 3.2M
    stages/<pair>/2_sft.yaml             Stage 2   recipes/sft.py  SFT control on the 20K MMPR rows
    stages/<pair>/2_pivot.yaml           Stage 2   recipes/dpo.py  DPO = PIVOT on the same 20K rows
    stages/<pair>/2_mpo.yaml             Table E   recipes/dpo.py  MPO (only the pairs Table E uses)
    data_scaling/{sft,pivot}_<N>k.yaml   Fig. 4/5, Table M/T
    table_f/<llm>_<variant>_{sft,pivot}.yaml, fig_b/ratio<r>_{sft,pivot}.yaml
    stage3/..., table_j/..., table_k/...  Stage 3 (evaluation of an encoder inside a fresh MLLM), Tables I/J/K
The whole chain for one pair (1a -> 1b -> 2 -> export -> Stage 3 -> eval) runs from these files with
`bash recipes/paper/run_chain.sh <pair> [step...]` (written by hand: it only reads the pair's folder).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


HERE = Path(__file__).resolve().parent
RUNS = "runs/paper"

# ------------------------------------------------------------------------------------------------------- models
# key -> (Hub id, real-shaped config: `resources/configs/<name>.json` or `resources/configs_extra/<name>.json`, label)
ENCODERS = {
    "siglip-so400m": ("google/siglip-so400m-patch14-384", "siglip-so400m-patch14-384.vision", "SigLIP 1 So400m/14"),
    "siglip2-base": ("google/siglip2-base-patch16-384", "siglip2-base-patch16-384.vision", "SigLIP 2 B/16"),
    "siglip2-large": ("google/siglip2-large-patch16-384", "siglip2-large-patch16-384.vision", "SigLIP 2 L/16"),
    "siglip2-so400m": ("google/siglip2-so400m-patch16-384", "siglip2-so400m-patch16-384.vision", "SigLIP 2 So400m/16"),
    "siglip2-giant": ("google/siglip2-giant-opt-patch16-384", "siglip2-giant-opt-patch16-384.vision", "SigLIP 2 g/16"),
    "clip-large-336": ("openai/clip-vit-large-patch14-336", "clip-vit-large-patch14-336.vision", "CLIP L/14-336"),
    "dinov2-giant": ("facebook/dinov2-giant", "dinov2-giant.vision", "DINOv2 g/14"),
    "mae-huge": ("facebook/vit-mae-huge", "vit-mae-huge.vision", "MAE H/14"),
    "moco-v3-base": ("nyu-visionx/moco-v3-vit-b", "moco-v3-vit-base.vision", "MoCo v3 B/16"),
    "vit-huge-sup": ("google/vit-huge-patch14-224-in21k", "vit-huge-patch14-224-in21k.vision", "ViT-H/14 supervised"),
}
LLMS = {
    "qwen2.5-0.5b": ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen2.5-0.5B-Instruct"),
    "qwen2.5-1.5b": ("Qwen/Qwen2.5-1.5B-Instruct", "Qwen2.5-1.5B-Instruct"),
    "qwen2.5-3b": ("Qwen/Qwen2.5-3B-Instruct", "Qwen2.5-3B-Instruct"),
    "qwen2.5-7b": ("Qwen/Qwen2.5-7B-Instruct", "Qwen2.5-7B-Instruct"),
}
# Hub id -> config name, for the test that every referenced model has a known real config.
HUB_CONFIGS = {hub: cfg for hub, cfg, _ in ENCODERS.values()} | {hub: cfg for hub, cfg in LLMS.values()}

TABLE1_ENCODERS = [
    "siglip-so400m",
    "siglip2-so400m",
    "siglip2-giant",
    "clip-large-336",
    "dinov2-giant",
    "mae-huge",
    "moco-v3-base",
    "vit-huge-sup",
]
SCALING_ENCODERS = ["siglip2-base", "siglip2-large", "siglip2-so400m", "siglip2-giant"]
SCALING_LLMS = list(LLMS)
MPO_PAIRS = ["siglip2-large+qwen2.5-1.5b", "siglip2-so400m+qwen2.5-1.5b"]  # Table E top/middle and bottom
DATA_SIZES_K = [3, 5, 10, 20, 40, 60, 80, 100, 150]  # Fig. 4/5 (3K..40K) and Table M (20K..150K)
NEW_DISTRIBUTION_PERCENT = [0, 50, 80]  # Fig. B


def pairs() -> list[str]:
    """Every (encoder, LLM) pair that some table trains: Table 1 with Qwen2.5-1.5B, and the 4 x 4 scaling grid."""
    out = [f"{e}+qwen2.5-1.5b" for e in TABLE1_ENCODERS]
    out += [f"{e}+{llm}" for e in SCALING_ENCODERS for llm in SCALING_LLMS]
    return list(dict.fromkeys(out))


# --------------------------------------------------------------------------------------------------------- data
LCS_558K = ("data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json", "data/LLaVA-Pretrain/images")
ONEVISION_SI = ("data/LLaVA-OneVision-Data/onevision_si.yaml", "data/LLaVA-OneVision-Data")
MMPR = "data/MMPR-v1.2"
CAMBRIAN_737K = ("data/Cambrian-737k/Cambrian737k.jsonl", "data/Cambrian-737k")

COMMON = {
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,  # < 1: a fraction of the total steps (transformers 5 folded warmup_ratio into it)
    "weight_decay": 0.0,
    "max_length": 2048,
    "bf16": True,
    "gradient_checkpointing": True,
    "attn_implementation": "sdpa",
    # No `dtype`: weights stay fp32 (bf16 compute via `bf16: true`), so 1e-6 AdamW steps on the encoder are not
    # rounded away when a run goes without DeepSpeed's fp32 master weights.
    "logging_steps": 10,
    "save_strategy": "steps",
    "save_steps": 500,
    "save_total_limit": 1,
    # TRL's recommended tracker; local-first: a SQLite file under $TRACKIO_DIR (default ~/.cache/huggingface/trackio),
    # nothing leaves the machine unless `trackio_space_id` is set. `trackio show` opens the dashboard.
    "report_to": "trackio",
    "project": "pivot-hf",
    "seed": 42,
}
ALL_PARTS = ["vision_tower", "projector", "language_model"]


# ------------------------------------------------------------------------------------------------ YAML writing
def _scalar(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.1e}" if 0 < abs(value) < 1e-3 else repr(value)
    if isinstance(value, int):
        return str(value)
    text = str(value)
    plain = text and all(c.isalnum() or c in "-_./+" for c in text) and text not in ("none", "true", "false", "null")
    return text if plain else '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_yaml(header: list[str], body: dict) -> str:
    """A flat YAML mapping (scalars and lists of scalars), with a comment header. `yaml.safe_load` reads it back."""
    lines = [f"# {h}" if h else "#" for h in header]
    for key, value in body.items():
        if isinstance(value, list):
            lines.append(f"{key}: [{', '.join(_scalar(v) for v in value)}]")
        else:
            lines.append(f"{key}: {_scalar(value)}")
    return "\n".join(lines) + "\n"


def _compose(pair: str) -> dict:
    enc, llm = pair.split("+")
    return {"vision_model_name_or_path": ENCODERS[enc][0], "text_model_name_or_path": LLMS[llm][0]}


def _batch(per_device: int, accumulation: int) -> dict:
    return {"per_device_train_batch_size": per_device, "gradient_accumulation_steps": accumulation}


def _header(script: str, what: str, folder: str, name: str, zero: str, extra: list[str] | None = None) -> list[str]:
    # The paper ran Stage 2 with ZeRO-3 and every other stage with ZeRO-2 (8 GPUs each).
    launch = f"accelerate launch --config_file accelerate_configs/{zero}.yaml recipes/{script}"
    return [
        f"script: recipes/{script}",
        what,
        "Generated by recipes/paper/generate.py: edit that script, not this file.",
        f"{launch} --config recipes/paper/{folder}/{name}",
        *(extra or []),
    ]


# ------------------------------------------------------------------------------------------------------ stages
def stage1a(pair: str) -> dict:
    return {
        **_compose(pair),
        "vision_feature_layer": -2,
        "projector_type": "mlp2x_gelu",
        "dataset_name": LCS_558K[0],
        "image_folder": LCS_558K[1],
        "template": "plain",
        "tunable_parts": ["projector"],
        "learning_rate": 1e-3,
        "num_train_epochs": 1,
        **_batch(8, 4),
        **COMMON,
        "output_dir": f"{RUNS}/{pair}/1a_projector",
    }


def stage1b(pair: str) -> dict:
    return {
        "model_name_or_path": f"{RUNS}/{pair}/1a_projector",
        "dataset_name": ONEVISION_SI[0],
        "image_folder": ONEVISION_SI[1],
        "template": "chat",
        "num_samples": -1,
        "tunable_parts": ALL_PARTS,
        "learning_rate": 1e-5,
        "vision_tower_lr": 2e-6,
        "num_train_epochs": 1,
        **_batch(2, 16),
        **COMMON,
        "output_dir": f"{RUNS}/{pair}/1b_finetune",
    }


def stage2(pair: str, method: str, *, num_samples: int = 20000, variant: str = "none", ratio=None, out=None) -> dict:
    """Stage 2 on the MMPR subset: `sft` (chosen answers, lr 5e-6) or `pivot` (sigmoid DPO, beta 0.1, lr 1e-6) or
    `mpo` (DPO + BCO-pair + SFT, weights 0.8/0.2/1.0); every other value is shared, so only the objective differs."""
    body = {
        "model_name_or_path": f"{RUNS}/{pair}/1b_finetune",
        "dataset_name": MMPR,
        "num_samples": num_samples,
        "dataset_seed": 777,
        "max_text_tokens": 1500,
        "variant": variant,
    }
    if ratio is not None:
        body["new_distribution_ratio"] = float(ratio)
    body["tunable_parts"] = ALL_PARTS
    if method == "sft":
        body |= {"learning_rate": 5e-6, **_batch(2, 16)}
    else:
        body |= {"learning_rate": 1e-6, **_batch(1, 32), "beta": 0.1}
        if method == "pivot":
            body["loss_type"] = ["sigmoid"]
        else:
            body |= {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}
    body |= {"num_train_epochs": 3, **COMMON}
    body["output_dir"] = out or f"{RUNS}/{pair}/2_{method}"
    return body


def stage3(encoder: str, llm: str, step: str, *, out: str, data=CAMBRIAN_737K, reuse: int = 1, full=False) -> dict:
    """Stage 3: a frozen (exported) encoder in a fresh MLLM. `3a`: projector pretraining (Table I's reuse of the
    PIVOT projector's first `reuse` layers, frozen); `3b`: projector + LLM finetuning (`full`: every part, Table K)."""
    if step == "3a":
        body = {
            "vision_model_name_or_path": encoder,
            "text_model_name_or_path": LLMS[llm][0],
            # No `vision_feature_layer`: the layer the exported encoder records (`pivot_vision_feature_layer`: -2 for
            # a drop-in export, -1 for a truncated one; -2 for an original Hub encoder) is used.
            "projector_type": "mlp2x_gelu",
            "dataset_name": LCS_558K[0],
            "image_folder": LCS_558K[1],
            "template": "plain",
            "tunable_parts": ["projector"],
            "learning_rate": 1e-3,
            "num_train_epochs": 1,
            **_batch(8, 4),
        }
        if reuse:
            # "1+1": the reused first layer stays frozen and a new second layer trains. With both layers reused there
            # is no new layer to train, so they are initialised from PIVOT and keep training (see _stage3_notes).
            body |= {"projector_init_from": encoder, "projector_reuse_layers": reuse}
            body["freeze_reused_projector"] = reuse == 1
    else:
        body = {
            "model_name_or_path": out.rsplit("/", 1)[0] + "/3a_projector",
            "dataset_name": data[0],
            "image_folder": data[1],
            "template": "chat",
            "num_samples": -1,
            "tunable_parts": ALL_PARTS if full else ["projector", "language_model"],
            "learning_rate": 1e-5,
            **_batch(2, 16),
        }
        if full:
            body["vision_tower_lr"] = 2e-6  # finetune_si.sh's vision LR (the paper's Stage-3 script)
        if reuse == 1:
            # Keep the reused PIVOT layer frozen in 3b as well (Table I "1+1"): re-applied from the same export.
            body |= {"projector_init_from": encoder, "projector_reuse_layers": 1, "freeze_reused_projector": True}
    return {**body, **COMMON, "output_dir": out}


# ------------------------------------------------------------------------------------------------------- files
def build() -> dict[str, str]:
    """Relative path (under recipes/paper/) -> file content, for every generated file."""
    files: dict[str, str] = {}

    def put(rel: str, script: str, what: str, body: dict, extra: list[str] | None = None):
        folder, name = rel.rsplit("/", 1)
        zero = "zero3" if "model_name_or_path" in body and "dataset_seed" in body else "zero2"  # Stage 2 = MMPR rows
        if body.get("report_to") == "trackio":
            body = {**body, "run_name": rel.removesuffix(".yaml")}  # the tracker's name for the run
        files[rel] = to_yaml(_header(script, what, folder, name, zero, extra), body)

    for pair in pairs():
        enc, llm = pair.split("+")
        label = f"{ENCODERS[enc][2]} + {LLMS[llm][0]}"
        d = f"stages/{pair}"
        put(f"{d}/1a_projector.yaml", "sft.py", f"Stage 1a, {label}: projector-only pretraining.", stage1a(pair))
        put(f"{d}/1b_finetune.yaml", "sft.py", f"Stage 1b, {label}: full finetuning (vision lr 2e-6).", stage1b(pair))
        put(f"{d}/2_sft.yaml", "sft.py", f"Stage 2 SFT control, {label}.", stage2(pair, "sft"))
        put(f"{d}/2_pivot.yaml", "dpo.py", f"Stage 2 PIVOT (DPO), {label}.", stage2(pair, "pivot"))
        if pair in MPO_PAIRS:
            put(f"{d}/2_mpo.yaml", "dpo.py", f"Table E: Stage 2 MPO, {label}.", stage2(pair, "mpo"))

    headline = "siglip2-so400m+qwen2.5-1.5b"
    for size in DATA_SIZES_K:
        for method in ("sft", "pivot"):
            body = stage2(headline, method, num_samples=size * 1000, out=f"{RUNS}/data_scaling/{method}_{size}k")
            script = "dpo.py" if method == "pivot" else "sft.py"
            put(f"data_scaling/{method}_{size}k.yaml", script, f"Fig. 4/5, Table M/T: {size}K rows, {method}.", body)

    for llm in ("qwen2.5-1.5b", "qwen2.5-3b"):
        pair = f"siglip2-so400m+{llm}"
        for variant in ("nothink", "under30"):
            for method in ("sft", "pivot"):
                body = stage2(pair, method, variant=variant, out=f"{RUNS}/table_f/{llm}_{variant}_{method}")
                script = "dpo.py" if method == "pivot" else "sft.py"
                put(f"table_f/{llm}_{variant}_{method}.yaml", script, f"Table F: {variant}, {llm}, {method}.", body)

    for ratio in NEW_DISTRIBUTION_PERCENT:
        for method in ("sft", "pivot"):
            body = stage2("siglip2-so400m+qwen2.5-3b", method, ratio=ratio, out=f"{RUNS}/fig_b/ratio{ratio}_{method}")
            script = "dpo.py" if method == "pivot" else "sft.py"
            put(
                f"fig_b/ratio{ratio}_{method}.yaml", script, f"Fig. B: {ratio}% new-distribution rows, {method}.", body
            )

    # Stage 3 templates: the encoder and output paths are given on the command line (run_chain.sh, README).
    enc_ph, out_ph = "<exported-encoder>", f"{RUNS}/<pair>/stage3_<post>"
    for reuse in (0, 1, 2):
        for step in ("3a", "3b"):
            name = f"stage3/{step}_reuse{reuse}.yaml"
            what = f"Stage {step}, Table I: {reuse} PIVOT projector layer(s) reused, {2 - reuse} new."
            out = f"{out_ph}/{'3a_projector' if step == '3a' else '3b_finetune'}"
            body = stage3(enc_ph, "qwen2.5-1.5b", step, out=out, reuse=reuse)
            put(name, "sft.py", what, body, _stage3_notes(reuse))
    for llm in ("qwen2.5-0.5b", "qwen2.5-1.5b"):
        out = f"{RUNS}/table_j/<encoder>_{llm}/3b_finetune"
        body = stage3(enc_ph, llm, "3b", out=out, data=ONEVISION_SI)
        put(f"table_j/3b_onevision_{llm}.yaml", "sft.py", f"Table J: Stage 3b on LLaVA-OV-3M, {llm}.", body)
        out = f"{RUNS}/table_k/<encoder>_{llm}/3b_finetune"
        body = stage3(enc_ph, llm, "3b", out=out, full=True)
        put(f"table_k/3b_full_{llm}.yaml", "sft.py", f"Table K: full-parameter Stage 3b, {llm}.", body)
    return files


def _stage3_notes(reuse: int) -> list[str]:
    notes = ["Pass --vision_model_name_or_path <export> (and --projector_init_from <export> when reusing layers)"]
    notes.append("and --output_dir; `<...>` values are placeholders the scripts refuse to run with.")
    if reuse == 2:
        notes += [
            "NOT the paper's '2+2': Table I appends two NEW layers after the two frozen reused ones (4 in all), but the",
            "Pivot projector has at most two linear layers (mlp2x_gelu). This recipe initialises both layers from the",
            "PIVOT projector and keeps training them: an approximation, documented in recipes/README.md.",
        ]
    return notes


def write(check: bool = False) -> list[str]:
    """Write every file (or, with `check`, list those that are missing or differ). Returns the paths that differ,
    counting as stale any file left in a generated folder that this script no longer writes (it is removed)."""
    files = build()
    stale = []
    for rel, content in files.items():
        path = HERE / rel
        if not path.is_file() or path.read_text() != content:
            stale.append(rel)
            if not check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(content)
    folders = {rel.split("/", 1)[0] for rel in files}
    for folder in sorted(folders):
        for path in sorted((HERE / folder).rglob("*")):
            rel = path.relative_to(HERE).as_posix()
            if path.is_file() and rel not in files:
                stale.append(rel)
                if not check:
                    path.unlink()
    return stale


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--check", action="store_true", help="Exit 1 when a generated file is missing, stale or orphaned."
    )
    args = parser.parse_args(argv)
    stale = write(check=args.check)
    if args.check and stale:
        print(f"{len(stale)} recipe files are stale; run `python recipes/paper/generate.py`:", *stale[:10], sep="\n  ")
        return 1
    print(f"{len(build())} files {'checked' if args.check else 'written'} under {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
