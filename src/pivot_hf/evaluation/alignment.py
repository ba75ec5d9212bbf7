"""Representation alignment by mutual k-nearest neighbours (Platonic Representation Hypothesis; paper Fig. 10).

For image-caption pairs, vision features (mean-pooled patch tokens of every encoder layer) and language features
(mean over the caption's tokens of every hidden state of a reference LLM, embeddings included) are each clamped to
+-q, q the 95th percentile of |x| over the whole set, and L2-normalised per sample. For sample i, knn_V(i) and knn_L(i)
are the k nearest other samples by cosine similarity; score_i = |knn_V(i) & knn_L(i)| / k; alignment = mean over i.
The reported number is the maximum over (vision layer, LLM layer) pairs.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm


def preprocess_features(x: np.ndarray | torch.Tensor, clamp_quantile: float = 0.95) -> torch.Tensor:
    """Clamp to +-quantile(|x|) (computed over every entry of the set), then L2-normalise each row."""
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    if clamp_quantile is not None and clamp_quantile < 1.0:
        # numpy, not torch.quantile: the latter refuses inputs above 16M entries (1024 x 4096 x layers reaches that).
        q = float(np.quantile(np.abs(x.numpy()), clamp_quantile))
        x = x.clamp(-q, q)
    return torch.nn.functional.normalize(x, dim=-1)


def knn_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """(N, k) indices of each row's k most cosine-similar other rows (rows are assumed L2-normalised)."""
    sim = x @ x.T
    sim.fill_diagonal_(-float("inf"))
    return sim.topk(k, dim=1).indices


def mutual_knn(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    """Mean over samples of |knn_a(i) & knn_b(i)| / k for two already-preprocessed feature sets of the same samples."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"Feature sets differ in size: {a.shape[0]} vs {b.shape[0]}")
    if k >= a.shape[0]:
        raise ValueError(f"k={k} needs more than k samples (got {a.shape[0]})")
    n = a.shape[0]
    ma = torch.zeros(n, n, dtype=torch.bool)
    mb = torch.zeros(n, n, dtype=torch.bool)
    ma.scatter_(1, knn_indices(a, k), True)
    mb.scatter_(1, knn_indices(b, k), True)
    return float((ma & mb).sum(dim=1).float().div(k).mean())


def alignment_matrix(
    vision_layers: np.ndarray, text_layers: np.ndarray, k: int = 10, clamp_quantile: float = 0.95
) -> np.ndarray:
    """(Lv, Lt) mutual-kNN scores for layer stacks (Lv, N, Dv) and (Lt, N, Dt)."""
    vis = [preprocess_features(v, clamp_quantile) for v in vision_layers]
    txt = [preprocess_features(t, clamp_quantile) for t in text_layers]
    return np.array([[mutual_knn(v, t, k) for t in txt] for v in vis])


def summarize_alignment(matrix: np.ndarray) -> dict:
    i, j = np.unravel_index(int(np.argmax(matrix)), matrix.shape)
    return {"alignment": float(matrix[i, j]), "best_vision_layer": int(i), "best_text_layer": int(j)}


@torch.no_grad()
def language_features(
    model, tokenizer, captions: list[str], batch_size: int = 32, device: str = "cpu", max_length: int = 256
) -> np.ndarray:
    """(L + 1, N, D): mean over each caption's tokens (padding excluded) of every hidden state, embeddings included."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    out = None
    for s in tqdm(range(0, len(captions), batch_size), desc="caption features"):
        batch = tokenizer(
            captions[s : s + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length
        ).to(device)
        hs = model(**batch, output_hidden_states=True, return_dict=True).hidden_states
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = torch.stack([(h.float() * mask).sum(1) / mask.sum(1).clamp(min=1) for h in hs])
        if out is None:
            out = np.zeros((pooled.shape[0], len(captions), pooled.shape[-1]), dtype=np.float32)
        out[:, s : s + pooled.shape[1]] = pooled.cpu().numpy()
    return out


def alignment_over_seeds(
    vision_layers: np.ndarray,
    text_layers: np.ndarray,
    k: int = 10,
    seeds: tuple[int, ...] = (0,),
    max_samples: int | None = None,
    clamp_quantile: float = 0.95,
) -> dict:
    """Max-over-layer-pairs alignment per seed; a seed draws `max_samples` pairs (all pairs, in order, when None)."""
    n = vision_layers.shape[1]
    per_seed = []
    for seed in seeds:
        idx = np.arange(n)
        if max_samples is not None and max_samples < n:
            idx = np.sort(np.random.default_rng(seed).choice(n, max_samples, replace=False))
        m = alignment_matrix(vision_layers[:, idx], text_layers[:, idx], k, clamp_quantile)
        per_seed.append({"seed": seed, **summarize_alignment(m), "matrix": m.tolist()})
    vals = np.array([r["alignment"] for r in per_seed])
    return {
        "alignment_mean": float(vals.mean()),
        "alignment_std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
        "per_seed": per_seed,
    }
