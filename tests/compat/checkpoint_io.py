"""Write or read a tiny Pivot checkpoint under the installed library versions (run by tests/test_compat.py).

`write DIR`: compose a tiny SigLIP + Qwen2 Pivot MLLM, save it (remote-code files included) with the inputs of one
image-text prompt and the float32 logits it gives, plus the versions that wrote it.
`read DIR`: load DIR with pivot_hf and, in a fresh interpreter where `import pivot_hf` fails, through `auto_map`
(`trust_remote_code=True`, the checkpoint's own modeling_pivot.py); print one JSON line with the max absolute logit
difference of each against the writer's logits, and the versions that read it.
"""

import json
import subprocess
import sys
from pathlib import Path


FIXTURE_IMAGE = Path(__file__).resolve().parents[1] / "fixtures" / "llava-mini" / "images"


def versions() -> dict:
    import tokenizers
    import torch
    import transformers
    import trl

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "tokenizers": tokenizers.__version__,
    }


def write(folder: Path) -> None:
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from pivot_hf import PivotForConditionalGeneration, PivotProcessor
    from pivot_hf.testing import build_tiny_pivot

    path = build_tiny_pivot(folder / "checkpoint", family="siglip", arch="qwen2")
    model = PivotForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    processor = PivotProcessor.from_pretrained(path)
    image = Image.open(sorted(FIXTURE_IMAGE.glob("*.jpg"))[0]).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    tensors = {f"in.{k}": v.contiguous() for k, v in inputs.items()} | {"logits": logits.contiguous()}
    save_file(tensors, str(folder / "io.safetensors"))
    (folder / "writer.json").write_text(json.dumps(versions()))


def _max_diff(model, folder: Path) -> float:
    import torch
    from safetensors.torch import load_file

    io = load_file(str(folder / "io.safetensors"))
    inputs = {k[len("in.") :]: v for k, v in io.items() if k.startswith("in.")}
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.dtype == io["logits"].dtype == torch.float32 and logits.shape == io["logits"].shape
    return float((logits - io["logits"]).abs().max())


def read_remote(folder: Path) -> None:
    sys.modules["pivot_hf"] = None  # any import of pivot_hf now raises ImportError
    import torch
    from transformers import AutoModelForImageTextToText

    path = str(folder / "checkpoint")
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    assert "pivot_hf" not in type(model).__module__, type(model).__module__
    print(json.dumps({"remote_code": _max_diff(model, folder), "module": type(model).__module__}))


def read(folder: Path) -> None:
    import torch

    from pivot_hf import PivotForConditionalGeneration

    model = PivotForConditionalGeneration.from_pretrained(folder / "checkpoint", dtype=torch.float32).eval()
    result = {"pivot_hf": _max_diff(model, folder)}
    remote = subprocess.run(
        [sys.executable, __file__, "read-remote", str(folder)], capture_output=True, text=True, timeout=600
    )
    if remote.returncode != 0:
        raise SystemExit(f"remote-code load failed:\n{remote.stderr[-4000:]}")
    result |= json.loads(remote.stdout.strip().splitlines()[-1])
    result |= {"writer": json.loads((folder / "writer.json").read_text()), "reader": versions()}
    print(json.dumps(result))


if __name__ == "__main__":
    mode, folder = sys.argv[1], Path(sys.argv[2])
    {"write": write, "read": read, "read-remote": read_remote}[mode](folder)
