"""Training: SFT, DPO (= PIVOT) and MPO with the vision tower training, on tiny models and the MMPR fixture.

Runs are kept to 1-2 optimizer steps on one thread each (the CI box has 2 shared cores).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForImageTextToText

import pivot_hf  # noqa: F401  (registers the Auto classes)
from pivot_hf import PivotForConditionalGeneration, PivotProcessor
from pivot_hf.configs import PivotDPOConfig, PivotSFTConfig, RecipeConfigError
from pivot_hf.data import load_pivot_dataset
from pivot_hf.trainer import PivotDPOTrainer, PivotSFTTrainer


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))
LRS = {"language_model": 1e-4, "projector": 5e-4, "vision_tower": 1e-3}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tiny_pivot_factory):
    return tiny_pivot_factory("siglip")


@pytest.fixture(scope="module")
def mmpr(fixtures_dir):
    return str(fixtures_dir / "mmpr-mini")


def _flags(output_dir, steps=2, **extra):
    flags = {
        "output_dir": str(output_dir),
        "max_steps": steps,
        "per_device_train_batch_size": 2,
        "gradient_checkpointing": "false",
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": "true",
        "max_length": 512,
        "learning_rate": LRS["language_model"],
        "projector_lr": LRS["projector"],
        "vision_tower_lr": LRS["vision_tower"],
        "seed": 0,
        **extra,
    }
    argv = []
    for key, value in flags.items():
        argv += [f"--{key}"] + ([str(v) for v in value] if isinstance(value, list) else [str(value)])
    return argv


def _config_kwargs(output_dir, steps=1, **extra):
    kwargs = {
        "output_dir": str(output_dir),
        "max_steps": steps,
        "per_device_train_batch_size": 2,
        "gradient_checkpointing": False,
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": True,
        "max_length": 512,
        "learning_rate": LRS["language_model"],
        "projector_lr": LRS["projector"],
        "vision_tower_lr": LRS["vision_tower"],
        "seed": 0,
    }
    kwargs.update(extra)
    return kwargs


def _weights(path_or_model, prefix="model.vision_tower."):
    model = path_or_model
    if isinstance(model, (str, os.PathLike)):
        model = PivotForConditionalGeneration.from_pretrained(model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(prefix)}


def _assert_vision_trained(before: dict, model):
    after = _weights(model)
    unreached = set(model.unreached_vision_parameter_names())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    reached = set(before) - unreached
    assert reached and changed == reached, f"unchanged vision weights: {sorted(reached - changed)[:5]}"
    assert not (changed & unreached), "weights above the feature layer must stay frozen"


def _group_lrs(optimizer):
    return {g["name"].replace("_no_decay", ""): g["initial_lr"] for g in optimizer.param_groups}


# ------------------------------------------------------------------------------------------------ the recipe scripts
@pytest.mark.compat
def test_dpo_script_trains_vision_tower_with_per_part_lrs(tiny, mmpr, tmp_path):
    from dpo import main as dpo_main

    before = _weights(tiny)
    trainer = dpo_main(["--model_name_or_path", tiny, "--dataset_name", mmpr] + _flags(tmp_path / "out"))
    model = trainer.accelerator.unwrap_model(trainer.model)
    _assert_vision_trained(before, model)
    assert _group_lrs(trainer.optimizer) == LRS
    # The reference is a separate, frozen copy of the starting checkpoint (vision tower included) and did not move.
    ref = trainer.accelerator.unwrap_model(trainer.ref_model)
    assert ref is not model and not any(p.requires_grad for p in ref.parameters())
    for name, tensor in _weights(ref).items():
        assert torch.equal(tensor, before[name])
    # output_dir: a Pivot checkpoint loadable with the Auto class, the processor and the logs.
    out = tmp_path / "out"
    reloaded = AutoModelForImageTextToText.from_pretrained(out)
    assert type(reloaded).__name__ == "PivotForConditionalGeneration"
    for name, tensor in _weights(reloaded).items():
        torch.testing.assert_close(tensor, model.get_parameter(name).detach(), rtol=0, atol=0)
    PivotProcessor.from_pretrained(out)
    run = json.loads((out / "pivot_run.json").read_text())
    assert run["global_step"] == 2 and run["tensors_changed"]["vision_tower"][0] > 0
    assert (out / "trainer_state.json").is_file() and (out / "data_report.json").is_file()


@pytest.mark.compat
def test_sft_script_trains_on_answers_with_vision_tower(tiny, mmpr, tmp_path):
    from sft import main as sft_main

    before = _weights(tiny)
    trainer = sft_main(["--model_name_or_path", tiny, "--dataset_name", mmpr] + _flags(tmp_path / "out"))
    _assert_vision_trained(before, trainer.accelerator.unwrap_model(trainer.model))
    assert _group_lrs(trainer.optimizer) == LRS
    # The loss covers the chosen answer (+ end of turn) only, as in the official recipe.
    rows = [trainer.train_dataset[i] for i in range(2)]
    batch = trainer.data_collator(rows)
    tokenizer = trainer.processing_class.tokenizer
    for row, ids, labels in zip(rows, batch["input_ids"], batch["labels"]):
        answer = row["messages"][-1]["content"]
        answer = answer if isinstance(answer, str) else "".join(p.get("text", "") for p in answer)
        assert tokenizer.decode(ids[labels != -100]) == answer + "<|im_end|>"


def test_sft_loss_on_every_assistant_turn_of_multi_turn_rows(tiny, fixtures_dir, tmp_path):
    from sft import main as sft_main

    instruct = str(fixtures_dir / "llava-mini" / "instruct.json")
    flags = _flags(tmp_path / "out") + ["--image_folder", str(fixtures_dir / "llava-mini" / "images")]
    trainer = sft_main(["--model_name_or_path", tiny, "--dataset_name", instruct] + flags)
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer.data_collator(rows)
    tokenizer = trainer.processing_class.tokenizer
    for row, ids, labels in zip(rows, batch["input_ids"], batch["labels"]):
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        answers = [a if isinstance(a, str) else "".join(p.get("text", "") for p in a) for a in answers]
        assert tokenizer.decode(ids[labels != -100]) == "".join(a + "<|im_end|>" for a in answers)
    assert any(sum(m["role"] == "assistant" for m in r["messages"]) > 1 for r in rows)  # a multi-turn row was seen


def test_projector_pretraining_plain_template(tiny, fixtures_dir, tmp_path):
    """Stage 1a: LLaVA `plain` captions, projector only: the tower and the LLM stay bit-identical."""
    from sft import main as sft_main

    llava = fixtures_dir / "llava-mini"
    before_all = _weights(tiny, prefix="")
    argv = ["--model_name_or_path", tiny, "--dataset_name", str(llava / "pretrain.json")]
    argv += ["--image_folder", str(llava / "images"), "--template", "plain", "--tunable_parts", "projector"]
    trainer = sft_main(argv + _flags(tmp_path / "out", steps=1))
    model = trainer.accelerator.unwrap_model(trainer.model)
    for name, tensor in before_all.items():
        same = torch.equal(tensor, model.get_parameter(name).detach())
        assert same != name.startswith("model.multi_modal_projector."), name
    assert _group_lrs(trainer.optimizer) == {"projector": LRS["projector"]}


# --------------------------------------------------------------------------------------------- trainers in-process
def _preference_data(processor):
    dataset, _ = load_pivot_dataset(
        str(Path(__file__).parent / "fixtures" / "mmpr-mini"),
        "preference",
        tokenizer=processor,
        max_length=512,
        num_image_tokens=processor.num_image_tokens(),
    )
    return dataset


def test_mpo_loss_mix_trains_vision_tower(tiny, tmp_path):
    processor = PivotProcessor.from_pretrained(tiny)
    model = PivotForConditionalGeneration.from_pretrained(tiny)
    ref = PivotForConditionalGeneration.from_pretrained(tiny)
    before = _weights(model)
    args = PivotDPOConfig(
        **_config_kwargs(tmp_path, loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])
    )
    trainer = PivotDPOTrainer(
        model, ref, args=args, train_dataset=_preference_data(processor), processing_class=processor
    )
    trainer.train()
    assert trainer.loss_types == ["sigmoid", "bco_pair", "sft"] and trainer.loss_weights == [0.8, 0.2, 1.0]
    _assert_vision_trained(before, model)


def test_frozen_vision_tower_stays_bit_identical(tiny, tmp_path):
    processor = PivotProcessor.from_pretrained(tiny)
    model = PivotForConditionalGeneration.from_pretrained(tiny)
    before = _weights(model, prefix="")
    dataset, _ = load_pivot_dataset(str(Path(__file__).parent / "fixtures" / "mmpr-mini"), "sft")
    args = PivotSFTConfig(**_config_kwargs(tmp_path, tunable_parts=["projector", "language_model"]))
    trainer = PivotSFTTrainer(model, args=args, train_dataset=dataset, processing_class=processor)
    trainer.train()
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    for name, tensor in before.items():
        same = torch.equal(tensor, model.get_parameter(name).detach())
        assert same == name.startswith("model.vision_tower."), name
    assert set(_group_lrs(trainer.optimizer)) == {"language_model", "projector"}
    assert trainer.tunable_parts_report["projector"]["changed"] == 4


def test_untrained_vision_tower_fails_loudly(tiny, tmp_path):
    """A vision tower that should train but does not change is an error at the end. Its LR 0 is refused at start;
    here the LR (1e-47) is positive but every fp32 update rounds away."""
    with pytest.raises(RecipeConfigError, match="'vision_tower' has learning rate 0"):
        PivotSFTConfig(**_config_kwargs(tmp_path, vision_tower_lr=0.0, max_steps=1))
    processor = PivotProcessor.from_pretrained(tiny)
    model = PivotForConditionalGeneration.from_pretrained(tiny)
    dataset, _ = load_pivot_dataset(str(Path(__file__).parent / "fixtures" / "mmpr-mini"), "sft")
    args = PivotSFTConfig(**_config_kwargs(tmp_path, vision_tower_lr=1e-47, max_steps=1))
    trainer = PivotSFTTrainer(model, args=args, train_dataset=dataset, processing_class=processor)
    with pytest.raises(RuntimeError, match="vision tower was meant to train"):
        trainer.train()


def _sequence_logps(model, batch):
    """Sum over response tokens of log p(token): from the full logits, independently of TRL's fused LM head."""
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    with torch.no_grad():
        logits = model(**inputs).logits.float()
    logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logps * batch["completion_mask"][:, 1:]).sum(-1)


def test_dpo_loss_equals_eq1(tiny, tmp_path):
    """The trainer's loss on a batch equals -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) computed here."""
    processor = PivotProcessor.from_pretrained(tiny)
    model = PivotForConditionalGeneration.from_pretrained(tiny)
    ref = PivotForConditionalGeneration.from_pretrained(tiny)
    torch.manual_seed(0)
    with torch.no_grad():  # the policy must differ from the reference, or the loss is log 2 whatever the code does
        for name, param in model.named_parameters():
            if name.startswith(("model.vision_tower.", "model.multi_modal_projector.")):
                param.add_(0.05 * torch.randn_like(param))
    beta = 0.1
    args = PivotDPOConfig(**_config_kwargs(tmp_path, beta=beta))
    dataset = _preference_data(processor)
    trainer = PivotDPOTrainer(model, ref, args=args, train_dataset=dataset, processing_class=processor)
    batch = trainer.data_collator([dataset[i] for i in range(3)])
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))

    pi_c, pi_r = _sequence_logps(model, batch).chunk(2)
    ref_c, ref_r = _sequence_logps(ref, batch).chunk(2)
    expected = -F.logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))).mean()
    assert abs(expected.item() - F.logsigmoid(torch.tensor(0.0)).neg().item()) > 1e-4
    torch.testing.assert_close(loss.detach().float(), expected, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------------ 2 processes
def test_two_process_cpu_run_keeps_groups_and_vision_updates(tiny, mmpr, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_DISABLED": "true"}
    # accelerate's `--cpu` runs a single process (or mpirun); `--multi_gpu` starts torchrun, and `--use_cpu true`
    # makes each process join a gloo group on the CPU.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    cmd += [str(REPO / "recipes" / "dpo.py"), "--model_name_or_path", tiny, "--dataset_name", mmpr]
    cmd += _flags(out, per_device_train_batch_size=1, use_cpu="true")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = json.loads((out / "pivot_run.json").read_text())
    assert run["world_size"] == 2 and run["global_step"] == 2
    assert run["learning_rates"] == {f"{part}_no_decay": lr for part, lr in LRS.items()}
    assert run["tensors_changed"]["vision_tower"][0] == run["tensors_changed"]["vision_tower"][1] > 0
    _assert_vision_trained(_weights(tiny), PivotForConditionalGeneration.from_pretrained(out))


def test_converted_dataset_trains_through_both_scripts(tiny, mmpr, tmp_path):
    """`pivot-hf data convert-mmpr` -> a saved `datasets` folder -> `dataset_name` of recipes/dpo.py and sft.py."""
    from dpo import main as dpo_main
    from pivot_hf.cli import main as cli_main
    from pivot_hf.testing import qwen_tokenizer_path
    from sft import main as sft_main

    converted = tmp_path / "mmpr-converted"
    argv = ["data", "convert-mmpr", mmpr, "--output_dir", str(converted), "--tokenizer", qwen_tokenizer_path()]
    assert cli_main(argv + ["--show_progress", "false"]) == 0
    assert (converted / "preference").is_dir() and (converted / "sft").is_dir()
    dpo = dpo_main(
        ["--model_name_or_path", tiny, "--dataset_name", str(converted)] + _flags(tmp_path / "dpo", steps=1)
    )
    sft = sft_main(
        ["--model_name_or_path", tiny, "--dataset_name", str(converted)] + _flags(tmp_path / "sft", steps=1)
    )
    assert dpo.state.global_step == sft.state.global_step == 1
    # The SFT control trains on the chosen answers of exactly the rows the DPO run uses.
    assert sorted(dpo.train_dataset.with_format(None)["id"]) == sorted(sft.train_dataset.with_format(None)["id"])
