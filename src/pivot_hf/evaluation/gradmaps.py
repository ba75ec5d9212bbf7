"""Gradient maps of the SFT and DPO losses on the visual tokens (the paper's "Grad-CAM", Fig. 7 / Fig. F).

For one (image, question, chosen, rejected) sample:
- SFT loss = mean NLL of the chosen answer's tokens;
- DPO loss = Eq. 1: -log sigmoid(beta * ((log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r)))), sequence
  log-probs summed over response tokens, the reference a frozen copy (or log-probs precomputed from it).
Each loss is back-propagated to the visual tokens (default: the projector output, i.e. the LLM's visual tokens, where
the authors read it; `at="encoder"` reads the projector input, the encoder features). The image is encoded once and the
same leaf tensor feeds the chosen and the rejected forward, so the DPO gradient is the total one a training step sends
into the encoder. Per token the gradient is reduced over channels (L1 norm; or classic Grad-CAM: ReLU of the
gradient-weighted activations), reshaped to the patch grid and normalised to [0, 1] (divided by its maximum, so a token
with no gradient stays exactly 0).

`GradientMapCallback` saves these maps every N optimizer steps of a `transformers`/TRL training run.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import TrainerCallback


logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------------------------------
# Visual-token leaf
# ---------------------------------------------------------------------------------------------------------------------
def find_projector(model: torch.nn.Module) -> torch.nn.Module:
    for owner in (model, getattr(model, "model", None)):
        if owner is not None and hasattr(owner, "multi_modal_projector"):
            return owner.multi_modal_projector
    raise AttributeError(f"{type(model).__name__} has no `multi_modal_projector` (expected a LLaVA-style model).")


class VisualTokens:
    """Holds the leaf tensor that stands in for the visual tokens during the forward passes of one sample."""

    def __init__(self):
        self.leaf: torch.Tensor | None = None
        self.activations: torch.Tensor | None = None

    def _take(self, value: torch.Tensor) -> torch.Tensor:
        if self.leaf is None:
            self.activations = value.detach()
            self.leaf = value.detach().clone().requires_grad_(True)
        elif self.leaf.shape != value.shape:
            raise ValueError(
                f"Visual tokens changed shape between forwards: {tuple(self.leaf.shape)} -> {value.shape}"
            )
        return self.leaf


@contextmanager
def visual_token_leaf(model: torch.nn.Module, at: str = "projector"):
    """Within the context every forward of `model` uses one shared leaf for its visual tokens (gradients land there).

    `at="projector"`: the projector's output is replaced (the LLM's visual tokens). `at="encoder"`: the projector's
    input is replaced (the encoder features the projector reads), so the gradient is the one the encoder receives.
    """
    projector = find_projector(model)
    holder = VisualTokens()
    if at == "projector":
        handle = projector.register_forward_hook(lambda m, args, out: holder._take(out))
    elif at == "encoder":

        def pre_hook(m, args, kwargs):
            if args:
                return (holder._take(args[0]), *args[1:]), kwargs
            key = next(iter(kwargs))
            return args, {**kwargs, key: holder._take(kwargs[key])}

        handle = projector.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        raise ValueError(f"at must be 'projector' or 'encoder', got {at!r}")
    try:
        yield holder
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------------
def to_device(batch: dict, device, dtype) -> dict:
    """Move a processor batch; floating tensors (pixel values) also take the model's dtype."""
    return {k: v.to(device, dtype) if torch.is_floating_point(v) else v.to(device) for k, v in batch.items()}


def _model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def response_logps(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log-probs of the response tokens, number of response tokens) per sequence; labels -100 are prompt."""
    labels = batch["labels"]
    # Only the positions that predict answer tokens need logits; with a 150K vocabulary the rest dominate the cost.
    answer = (labels != IGNORE_INDEX).any(0).nonzero()
    keep = labels.shape[1] - int(answer[0]) + 1 if len(answer) and int(answer[0]) > 0 else labels.shape[1]
    logits = model(**_model_inputs(batch), logits_to_keep=keep).logits[:, :-1].float()
    labels = labels[:, labels.shape[1] - keep + 1 :]
    mask = labels != IGNORE_INDEX
    logp = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1), mask.sum(-1)


def dpo_loss_from_logps(policy_c, policy_r, ref_c, ref_r, beta: float = 0.1) -> torch.Tensor:
    """Eq. 1 (sigmoid DPO), mean over the batch."""
    return -F.logsigmoid(beta * ((policy_c - ref_c) - (policy_r - ref_r))).mean()


@torch.no_grad()
def reference_logps(ref_model: torch.nn.Module, chosen: dict, rejected: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probs of chosen and rejected under the frozen reference."""
    was_training = ref_model.training
    ref_model.eval()
    try:
        return response_logps(ref_model, chosen)[0], response_logps(ref_model, rejected)[0]
    finally:
        ref_model.train(was_training)


# ---------------------------------------------------------------------------------------------------------------------
# Maps
# ---------------------------------------------------------------------------------------------------------------------
def reduce_gradient(grad: torch.Tensor, activations: torch.Tensor | None = None, method: str = "l1") -> torch.Tensor:
    """(B, N, C) gradient -> (B, N) per-token map. "l1": L1 norm over channels (what the paper shows).
    "gradcam": ReLU(sum_c alpha_c * A_c), alpha_c = gradient averaged over tokens (Selvaraju et al., token grid)."""
    if method == "l1":
        return grad.abs().sum(-1)
    if method == "gradcam":
        if activations is None:
            raise ValueError("gradcam needs the activations")
        alpha = grad.mean(dim=1, keepdim=True)
        return (alpha * activations).sum(-1).clamp(min=0)
    raise ValueError(f"method must be 'l1' or 'gradcam', got {method!r}")


def to_grid(token_map: torch.Tensor | np.ndarray, grid: tuple[int, int] | None = None) -> np.ndarray:
    """(N,) -> (h, w); a square grid unless `grid` says otherwise."""
    m = np.asarray(token_map.detach().cpu() if torch.is_tensor(token_map) else token_map, dtype=np.float64)
    if grid is None:
        side = math.isqrt(m.size)
        if side * side != m.size:
            raise ValueError(f"{m.size} tokens are not a square grid; pass grid=(h, w)")
        grid = (side, side)
    return m.reshape(grid)


def normalize_map(m: np.ndarray) -> np.ndarray:
    """Divide by the maximum (zeros stay zeros); an all-zero map stays all zero."""
    mx = float(np.max(m)) if m.size else 0.0
    return m / mx if mx > 0 else np.zeros_like(m)


def replace_border(m: np.ndarray) -> np.ndarray:
    """Border patches <- their inner neighbours (border tokens can carry artefacts; paper protocol, optional)."""
    if min(m.shape) < 3:
        return m.copy()
    out = m.copy()
    out[0, :], out[-1, :] = out[1, :], out[-2, :]
    out[:, 0], out[:, -1] = out[:, 1], out[:, -2]
    return out


def gradient_maps(
    model: torch.nn.Module,
    chosen: dict,
    rejected: dict,
    ref_logps: tuple[torch.Tensor, torch.Tensor] | None = None,
    ref_model: torch.nn.Module | None = None,
    beta: float = 0.1,
    at: str = "projector",
    method: str = "l1",
    grid: tuple[int, int] | None = None,
    fix_border: bool = False,
) -> dict:
    """SFT and DPO gradient maps of one sample (batch size 1 in `chosen` / `rejected`, same image in both).

    Returns raw per-token maps (`sft_tokens`, `dpo_tokens`), normalised grids (`sft`, `dpo`) and the loss values.
    Model parameters' `.grad` are left untouched (gradients are taken w.r.t. the visual tokens only).
    """
    if ref_logps is None:
        ref_logps = reference_logps(ref_model if ref_model is not None else model, chosen, rejected)
    ref_c, ref_r = (t.detach() for t in ref_logps)
    was_training = model.training
    model.eval()  # dropout off, and transformers skips gradient checkpointing in eval mode
    out = {}
    try:
        with torch.enable_grad():
            with visual_token_leaf(model, at) as vt:
                logp_c, n_c = response_logps(model, chosen)
                sft = -(logp_c / n_c.clamp(min=1)).mean()
                (g_sft,) = torch.autograd.grad(sft, vt.leaf, retain_graph=True)
                logp_r, _ = response_logps(model, rejected)
                dpo = dpo_loss_from_logps(logp_c, logp_r, ref_c, ref_r, beta)
                (g_dpo,) = torch.autograd.grad(dpo, vt.leaf)
            acts = vt.activations
    finally:
        model.train(was_training)
    for name, g, loss in (("sft", g_sft, sft), ("dpo", g_dpo, dpo)):
        tokens = reduce_gradient(g.float(), acts.float(), method)[0]
        m = to_grid(tokens, grid)
        if fix_border:
            m = replace_border(m)
        out[f"{name}_tokens"] = tokens.detach().cpu().numpy()
        out[name] = normalize_map(m)
        out[f"{name}_loss"] = float(loss.detach())
    out["policy_logps"] = (float(logp_c.detach().sum()), float(logp_r.detach().sum()))
    out["ref_logps"] = (float(ref_c.sum()), float(ref_r.sum()))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Inputs from a processor
# ---------------------------------------------------------------------------------------------------------------------
def _image_token(processor) -> str:
    return getattr(processor, "image_token", None) or "<image>"


def _prompt(processor, question: str) -> str:
    tok = getattr(processor, "tokenizer", processor)
    q = question.replace("<image>\n", "").replace("<image>", "").strip()
    if getattr(tok, "chat_template", None) or getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
        templ = processor if getattr(processor, "chat_template", None) else tok
        return templ.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"{_image_token(processor)}\n{q}\n"


def build_pair_inputs(processor, image: Image.Image, question: str, chosen: str, rejected: str) -> tuple[dict, dict]:
    """Tokenised chosen / rejected batches (size 1) with labels on the answer tokens only."""
    tok = getattr(processor, "tokenizer", processor)
    prompt = _prompt(processor, question)
    eos = tok.eos_token or ""
    n_prompt = processor(images=image, text=prompt, return_tensors="pt")["input_ids"].shape[1]
    batches = []
    for answer in (chosen, rejected):
        enc = dict(processor(images=image, text=prompt + answer + eos, return_tensors="pt"))
        labels = enc["input_ids"].clone()
        labels[:, :n_prompt] = IGNORE_INDEX
        enc["labels"] = labels
        batches.append(enc)
    return batches[0], batches[1]


# ---------------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------------
def overlay(image: Image.Image, grid_map: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Heat map resized (bilinear) to the image and blended over it; (H, W, 3) uint8."""
    import matplotlib

    img = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    heat = Image.fromarray((np.clip(grid_map, 0, 1) * 255).astype(np.uint8)).resize(image.size, Image.BILINEAR)
    colored = matplotlib.colormaps[cmap](np.asarray(heat, dtype=np.float32) / 255.0)[..., :3]
    return (np.clip((1 - alpha) * img + alpha * colored, 0, 1) * 255).astype(np.uint8)


def save_side_by_side(
    path: str, image: Image.Image, maps: dict, title: str | None = None, panels: Sequence[str] = ("sft", "dpo")
) -> str:
    """PNG: the image, then one overlay per map in `panels`, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(4 * (1 + len(panels)), 4.3))
    axes[0].imshow(image)
    axes[0].set_title("image")
    for ax, name in zip(axes[1:], panels):
        ax.imshow(overlay(image, maps[name]))
        loss = maps.get(f"{name}_loss")
        ax.set_title(f"{name.upper()} gradient" + (f" (loss {loss:.3f})" if loss is not None else ""))
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title.replace("<image>", "").strip()[:120], fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_maps(out_dir: str, stem: str, image: Image.Image, maps: dict, title: str | None = None) -> dict:
    """Write `<stem>.png` (side by side), `<stem>.npz` (raw and normalised maps) and `<stem>.json` (losses)."""
    os.makedirs(out_dir, exist_ok=True)
    png = save_side_by_side(os.path.join(out_dir, f"{stem}.png"), image, maps, title)
    arrays = {k: np.asarray(v) for k, v in maps.items() if isinstance(v, np.ndarray)}
    np.savez(os.path.join(out_dir, f"{stem}.npz"), **arrays)
    scalars = {k: v for k, v in maps.items() if not isinstance(v, np.ndarray)}
    with open(os.path.join(out_dir, f"{stem}.json"), "w", encoding="utf-8") as f:
        json.dump(scalars, f, indent=1)
    return {"png": png, "npz": os.path.join(out_dir, f"{stem}.npz")}


# ---------------------------------------------------------------------------------------------------------------------
# Training callback
# ---------------------------------------------------------------------------------------------------------------------
class GradientMapCallback(TrainerCallback):
    """Saves SFT/DPO gradient maps of fixed samples every `every_n_steps` optimizer steps (and at step 0).

    `samples`: rows `{"image": PIL image or path, "question", "chosen", "rejected"}`. The reference log-probs come from
    `ref_model` when given, else from the model at `on_train_begin`, i.e. the starting checkpoint, which is what
    PIVOT's frozen reference is. Maps are computed on every process (ZeRO-3 needs all ranks in each forward) and
    written by the main one to `<output_dir>/step-<N>/sample-<i>.{png,npz,json}`. Training gradients are not touched.
    """

    def __init__(
        self,
        samples: Sequence[dict],
        processor,
        output_dir: str,
        every_n_steps: int = 20,
        beta: float = 0.1,
        at: str = "projector",
        method: str = "l1",
        ref_model: torch.nn.Module | None = None,
    ):
        self.samples = list(samples)
        self.processor = processor
        self.output_dir = output_dir
        self.every_n_steps = every_n_steps
        self.beta, self.at, self.method = beta, at, method
        self.ref_model = ref_model
        self._inputs: list[tuple[Image.Image, dict, dict]] | None = None
        self._ref: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.saved: list[str] = []

    def _prepare(self, model) -> None:
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        self._inputs = []
        for s in self.samples:
            image = s["image"] if isinstance(s["image"], Image.Image) else Image.open(s["image"]).convert("RGB")
            c, r = build_pair_inputs(self.processor, image, s["question"], s["chosen"], s["rejected"])
            self._inputs.append((image, to_device(c, device, dtype), to_device(r, device, dtype)))
        ref = self.ref_model if self.ref_model is not None else model
        self._ref = [reference_logps(ref, c, r) for _, c, r in self._inputs]

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._prepare(model)
            self._save(model, state, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None and self.every_n_steps > 0 and state.global_step % self.every_n_steps == 0:
            self._save(model, state, state.global_step)

    def _save(self, model, state, step: int) -> None:
        if self._inputs is None:
            self._prepare(model)
        out_dir = os.path.join(self.output_dir, f"step-{step}")
        for i, ((image, c, r), ref) in enumerate(zip(self._inputs, self._ref)):
            maps = gradient_maps(model, c, r, ref_logps=ref, beta=self.beta, at=self.at, method=self.method)
            if state.is_world_process_zero:
                paths = save_maps(
                    out_dir, f"sample-{i}", image, maps, title=f"step {step}: {self.samples[i]['question']}"
                )
                self.saved.append(paths["png"])
