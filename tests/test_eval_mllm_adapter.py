"""The `pivot` lmms-eval adapter end to end on a tiny Pivot checkpoint and an offline task in lmms-eval's format."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import pivot_hf
from pivot_hf.mllm_eval import registration
from pivot_hf.mllm_eval.adapter import PivotLMM
from pivot_hf.mllm_eval.local_runner import load_task_config, run_task
from pivot_hf.testing import build_tiny_pivot


HERE = os.path.dirname(os.path.abspath(__file__))
TASKS = os.path.join(HERE, "fixtures", "mllm_eval", "pivot_tiny")
VQA = os.path.join(TASKS, "pivot_tiny_vqa.yaml")
MC = os.path.join(TASKS, "pivot_tiny_mc.yaml")
REPO = os.path.dirname(HERE)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = build_tiny_pivot(tmp_path_factory.mktemp("mllm_eval") / "tiny-pivot", family="siglip")
    # A freshly initialised tiny LLM greedily repeats one token; larger random weights make its answers depend on the
    # prompt and the image, so comparing against the reference path below actually tests batching and ordering.
    model = pivot_hf.PivotForConditionalGeneration.from_pretrained(path)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "language_model" in name or "multi_modal_projector" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * (0.5 if param.dim() > 1 else 1.0))
    model.save_pretrained(path)
    return path


def _reference_answers(checkpoint, config, docs):
    """Per-document greedy answers through plain transformers (batch of one, no adapter code)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    kwargs = config["lmms_eval_specific_kwargs"]["default"]
    answers = []
    for doc in docs:
        images = config["doc_to_visual"](doc)
        text = config["doc_to_text"](doc, kwargs)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(images=images, text=[prompt], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **inputs, do_sample=False, max_new_tokens=config["generation_kwargs"]["max_new_tokens"]
            )
        answer = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        answers.append(answer.split("\n\n")[0].strip())
    return answers


def test_local_runner_generate_until_matches_plain_transformers(checkpoint):
    model = PivotLMM(pretrained=checkpoint, device="cpu", batch_size=2)  # 5 docs: batches of 2, 2, 1 (padding)
    out = run_task(model, VQA)
    samples = out["samples"]["pivot_tiny_vqa"]
    predictions = [s["resps"][0] for s in samples]

    config = load_task_config(VQA)
    docs = [json.loads(line) for line in open(os.path.join(TASKS, "tiny_vqa.jsonl"))]
    reference = _reference_answers(checkpoint, config, docs)
    assert predictions == reference
    assert len(set(predictions)) > 1  # the answers do depend on the image and question

    def norm(text):
        return " ".join(text.lower().strip().rstrip(".").split())

    expected_match = sum(norm(p) == norm(d["answer"]) for p, d in zip(reference, docs)) / len(docs)
    expected_contains = sum(norm(d["answer"]) in norm(p) for p, d in zip(reference, docs)) / len(docs)
    assert out["results"]["pivot_tiny_vqa"] == {
        "tiny_match,none": pytest.approx(expected_match),
        "tiny_contains,none": pytest.approx(expected_contains),
    }


def test_local_runner_loglikelihood_multiple_choice(checkpoint):
    model = PivotLMM(pretrained=checkpoint, device="cpu", batch_size=3)
    out = run_task(model, MC)
    samples = out["samples"]["pivot_tiny_mc"]
    config = load_task_config(MC)
    docs = [json.loads(line) for line in open(os.path.join(TASKS, "tiny_vqa.jsonl"))]
    tokenizer = model.processor.tokenizer

    correct = 0
    for sample, doc in zip(samples, docs):
        images = config["doc_to_visual"](doc)
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": config["doc_to_text"](doc)}]}
        ]
        prompt = model.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = model.processor(images=images, text=[prompt], return_tensors="pt")
        expected = []
        for choice in doc["choices"]:
            cont = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.cat([inputs["input_ids"], torch.tensor([cont])], dim=1)
            with torch.no_grad():
                logits = model.model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0]
            n = inputs["input_ids"].shape[1]
            logp = torch.log_softmax(logits.float(), dim=-1)
            expected.append(sum(logp[n - 1 + i, tok].item() for i, tok in enumerate(cont)))
        got = [ll for ll, _ in sample["resps"]]
        assert got == pytest.approx(expected, abs=1e-3)
        correct += max(range(len(expected)), key=expected.__getitem__) == doc["label"]
    assert out["results"]["pivot_tiny_mc"]["acc,none"] == pytest.approx(correct / len(docs))


# `make test-eval` installs lmms-eval and sets PIVOT_HF_REQUIRE_LMMS_EVAL=1: there, a missing or broken harness fails
# (with require_lmms_eval's message) instead of skipping; a plain `make test` without the extra still skips.
REQUIRE_LMMS_EVAL = os.environ.get("PIVOT_HF_REQUIRE_LMMS_EVAL") == "1"


@pytest.mark.skipif(
    not (registration.LMMS_EVAL_AVAILABLE or REQUIRE_LMMS_EVAL),
    reason="lmms-eval (the eval extra) is not installed; `make test-eval` installs it and runs this test",
)
def test_lmms_eval_runs_the_pivot_adapter_on_a_local_task(checkpoint):
    registration.require_lmms_eval()
    from lmms_eval.api.model import lmms
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import get_model
    from lmms_eval.tasks import TaskManager

    registration.register_with_lmms_eval()
    assert get_model("pivot") is PivotLMM and issubclass(PivotLMM, lmms)
    manager = TaskManager("WARNING", include_path=TASKS, include_defaults=False)
    results = simple_evaluate(
        model="pivot",
        model_args=f"pretrained={checkpoint},device=cpu",
        tasks=["pivot_tiny_vqa"],
        batch_size=2,
        task_manager=manager,
        log_samples=True,
        bootstrap_iters=0,
    )
    local = run_task(PivotLMM(pretrained=checkpoint, device="cpu", batch_size=1), VQA)
    harness_answers = {s["doc_id"]: s["filtered_resps"][0].strip() for s in results["samples"]["pivot_tiny_vqa"]}
    local_answers = {s["doc_id"]: s["resps"][0] for s in local["samples"]["pivot_tiny_vqa"]}
    assert harness_answers == local_answers
    for metric in ("tiny_match,none", "tiny_contains,none"):
        assert results["results"]["pivot_tiny_vqa"][metric] == pytest.approx(
            local["results"]["pivot_tiny_vqa"][metric]
        )


def test_recipe_offline_mode_writes_results(checkpoint, tmp_path):
    spec = importlib.util.spec_from_file_location("eval_mllm_recipe", os.path.join(REPO, "recipes", "eval_mllm.py"))
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    config = recipe.parse_args(
        ["--model_name_or_path", checkpoint, "--local_tasks", VQA, "--output_dir", str(tmp_path), "--device", "cpu"]
    )
    summary = recipe.main(config)
    assert summary["mode"] == "local_tasks"
    written = json.load(open(tmp_path / "results.json"))
    assert set(written["other_tasks"]["pivot_tiny_vqa"]) == {"tiny_match,none", "tiny_contains,none"}
    assert written["table"]["columns"][1]["name"] == "table_o/siglip2-so400m/pivot"
    assert "| **Average (All)** | | - | 55.6 |" in (tmp_path / "results.md").read_text()


def test_package_imports_and_adapter_works_without_lmms_eval():
    # A fresh interpreter where `import lmms_eval` fails, as on an install without the eval extra.
    code = (
        "import sys; sys.modules['lmms_eval'] = None\n"
        "from pivot_hf.mllm_eval import LMMS_EVAL_AVAILABLE, require_lmms_eval\n"
        "from pivot_hf.mllm_eval.adapter import PivotLMM\n"
        "assert not LMMS_EVAL_AVAILABLE and hasattr(PivotLMM, 'generate_until')\n"
        "try:\n    require_lmms_eval()\nexcept ImportError as e:\n    print('ERR', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ERR Running the MLLM benchmarks needs lmms-eval" in proc.stdout and ".[eval]" in proc.stdout
