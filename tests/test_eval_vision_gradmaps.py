"""Gradient maps of the SFT and DPO losses on the visual tokens, on a tiny Pivot MLLM and a real picture."""

import copy
import os

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer, TrainingArguments

import pivot_hf  # noqa: F401
from pivot_hf.evaluation.gradmaps import GradientMapCallback, build_pair_inputs, gradient_maps
from pivot_hf.testing import build_tiny_pivot


QUESTION, CHOSEN, REJECTED = "<image>\nWhat animal is this?", "A cat with green eyes.", "A brown dog on a sofa."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny_pivot(tmp_path_factory.mktemp("gradmaps") / "pivot", family="siglip")
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    image = Image.fromarray(skimage.data.chelsea())
    chosen, rejected = build_pair_inputs(processor, image, QUESTION, CHOSEN, REJECTED)
    return model, processor, image, chosen, rejected


def _independent_logp(model, batch, feats):
    """Sum of log-probs of the answer tokens, with the visual tokens given explicitly (no hooks involved)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], image_features=feats)
    logits, labels = out.logits[0, :-1], batch["labels"][0, 1:]
    sel = labels != -100
    lp = torch.log_softmax(logits[sel].float(), -1)
    return lp[torch.arange(int(sel.sum())), labels[sel]].sum(), int(sel.sum())


def test_maps_equal_the_gradients_of_their_own_losses(tiny):
    model, _, _, chosen, rejected = tiny
    ref = copy.deepcopy(model)  # the frozen reference of Eq. 1
    policy = copy.deepcopy(model)
    with torch.no_grad():  # a policy that has moved away from the reference, so the DPO log-ratios are not zero
        for p in policy.model.language_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    beta = 0.1
    maps = gradient_maps(policy, chosen, rejected, ref_model=ref, beta=beta)

    with torch.no_grad():
        feats_ref = torch.stack(ref.get_image_features(chosen["pixel_values"]).pooler_output)
        rc, _ = _independent_logp(ref, chosen, feats_ref)
        rr, _ = _independent_logp(ref, rejected, feats_ref)
    feats = torch.stack(policy.get_image_features(chosen["pixel_values"]).pooler_output).detach().requires_grad_(True)
    lc, n_c = _independent_logp(policy, chosen, feats)
    lr, _ = _independent_logp(policy, rejected, feats)
    sft = -lc / n_c
    dpo = -F.logsigmoid(beta * ((lc - rc) - (lr - rr)))
    (g_sft,) = torch.autograd.grad(sft, feats, retain_graph=True)
    (g_dpo,) = torch.autograd.grad(dpo, feats)

    assert maps["sft_loss"] == pytest.approx(float(sft), rel=1e-5)
    assert maps["dpo_loss"] == pytest.approx(float(dpo), rel=1e-5)
    np.testing.assert_allclose(maps["sft_tokens"], g_sft[0].abs().sum(-1).numpy(), rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(maps["dpo_tokens"], g_dpo[0].abs().sum(-1).numpy(), rtol=1e-4, atol=1e-8)
    # Same sample, different losses -> different maps (after normalisation, too)
    assert not np.allclose(maps["sft"], maps["dpo"], atol=1e-3)
    assert maps["sft"].shape == (4, 4) and maps["sft"].max() == pytest.approx(1.0)
    # Parameters' .grad untouched: the maps must not leak into a training step
    assert all(p.grad is None for p in policy.parameters())


def test_map_is_zero_on_tokens_that_cannot_affect_the_loss(tiny):
    model, _, _, chosen, rejected = tiny
    image_id = model.config.image_token_id
    blocked = None
    batches = []
    for b in (chosen, rejected):
        b = dict(b)
        pos = (b["input_ids"][0] == image_id).nonzero().flatten()
        blocked = np.r_[0:5, 9, 12]  # image tokens no other position may attend to
        mask = b["attention_mask"].clone()
        mask[0, pos[blocked]] = 0
        b["attention_mask"] = mask
        batches.append(b)
    for at in ("projector", "encoder"):
        maps = gradient_maps(model, batches[0], batches[1], beta=0.1, at=at)
        for name in ("sft", "dpo"):
            tokens = maps[f"{name}_tokens"]
            free = np.setdiff1d(np.arange(16), blocked)
            assert np.all(tokens[blocked] == 0.0), (at, name, tokens[blocked])
            assert np.all(tokens[free] > 0.0), (at, name)
            assert np.all(maps[name].reshape(-1)[blocked] == 0.0)


def test_callback_saves_maps_every_n_steps(tiny, tmp_path):
    model, processor, image, chosen, _ = tiny
    model = copy.deepcopy(model).train()
    row = {k: v[0] for k, v in chosen.items()}

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return row

    cb = GradientMapCallback(
        [{"image": image, "question": QUESTION, "chosen": CHOSEN, "rejected": REJECTED}],
        processor,
        str(tmp_path / "maps"),
        every_n_steps=2,
    )
    args = TrainingArguments(
        str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=1, learning_rate=1e-3, report_to=[],
        save_strategy="no", use_cpu=True, logging_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    before = [p.detach().clone() for p in model.parameters()]
    Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[cb]).train()
    assert sorted(os.listdir(tmp_path / "maps")) == ["step-0", "step-2", "step-4"]
    for step in (0, 2, 4):
        files = sorted(os.listdir(tmp_path / "maps" / f"step-{step}"))
        assert files == ["sample-0.json", "sample-0.npz", "sample-0.png"]
    first = np.load(tmp_path / "maps" / "step-0" / "sample-0.npz", allow_pickle=False)
    last = np.load(tmp_path / "maps" / "step-4" / "sample-0.npz", allow_pickle=False)
    assert not np.allclose(first["dpo_tokens"], last["dpo_tokens"])  # the model trained in between
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
