"""Representation alignment by mutual k-nearest neighbours (Platonic Representation Hypothesis; paper Fig. 10).

The protocol is that of the reference code the paper follows (platonic-rep, `measure_alignment.py` as its README runs
it, i.e. without `--precise`):

- Features: for the vision encoder, one vector per image from the output of every transformer block (the embeddings
  output is not a layer there); the CLS token for families that have one, the mean over patch tokens otherwise. For the
  reference LLM, the mean over each caption's tokens of every hidden state, embeddings included; captions are not
  truncated.
- Clamp: ONE threshold per model, computed over its whole (samples, layers, dim) feature stack, then every entry is
  clamped to +-threshold. The default threshold (`clamp_method="mean_per_sample"`) is the reference's default path:
  per sample, the `clamp_quantile` quantile (linear interpolation) of |x| over all its layers and channels, averaged
  over samples. `clamp_method="exact"` is the reference's `--precise` / `platonic.Alignment.score` path: the entry at
  index floor(q * numel) of all |x| sorted ascending.
- Then each layer's features are L2-normalised per sample. For sample i, knn_V(i) and knn_L(i) are the k nearest other
  samples by cosine similarity; score_i = |knn_V(i) & knn_L(i)| / k; alignment = mean over i. The reported number is
  the maximum over (vision layer, LLM layer) pairs.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm


CLAMP_METHODS = ("mean_per_sample", "exact")


def clamp_threshold(
    stack: np.ndarray | torch.Tensor, clamp_quantile: float = 0.95, clamp_method: str = "mean_per_sample"
) -> float:
    """The one clamp threshold of a feature stack `(L, N, D)` (layers, samples, channels); a `(N, D)` set is one layer.

    mean_per_sample: mean over samples n of quantile(|stack[:, n, :]|, q) (linear interpolation over its L * D entries).
    exact: sort all L * N * D values of |stack| ascending and take the one at index floor(q * numel).
    Raises ValueError for an unknown method or a quantile outside (0, 1].
    """
    if clamp_method not in CLAMP_METHODS:
        raise ValueError(f"clamp_method must be one of {CLAMP_METHODS}, got {clamp_method!r}")
    if not 0.0 < clamp_quantile <= 1.0:
        raise ValueError(f"clamp_quantile must lie in (0, 1], got {clamp_quantile}")
    x = np.asarray(stack.detach().cpu().numpy() if torch.is_tensor(stack) else stack, dtype=np.float32)
    x = x[None] if x.ndim == 2 else x
    if x.ndim != 3:
        raise ValueError(f"expected a (layers, samples, dim) stack or a (samples, dim) set, got shape {x.shape}")
    if clamp_method == "exact":
        flat = np.abs(x).reshape(-1)
        idx = int(clamp_quantile * flat.size)
        if idx >= flat.size:  # q = 1: the reference does not clamp at all
            return float("inf")
        return float(np.partition(flat, idx)[idx])
    # Samples in chunks: a (samples, layers * dim) copy of a 1024 x 25 x 4096 stack would double its memory.
    per_sample = []
    for s in range(0, x.shape[1], 64):
        chunk = np.abs(x[:, s : s + 64]).transpose(1, 0, 2).reshape(min(64, x.shape[1] - s), -1)
        per_sample.append(np.quantile(chunk, clamp_quantile, axis=1))
    return float(np.concatenate(per_sample).astype(np.float32).mean(dtype=np.float32))


def preprocess_stack(
    stack: np.ndarray | torch.Tensor, clamp_quantile: float = 0.95, clamp_method: str = "mean_per_sample"
) -> tuple[list[torch.Tensor], float]:
    """Clamp a `(L, N, D)` stack at its one threshold (`clamp_threshold`), then L2-normalise each layer per sample.

    Returns the L preprocessed `(N, D)` float32 tensors and the threshold (inf when `clamp_quantile` is 1: no clamp).
    """
    x = torch.as_tensor(np.asarray(stack, dtype=np.float32))
    x = x[None] if x.ndim == 2 else x
    q = clamp_threshold(x, clamp_quantile, clamp_method) if clamp_quantile < 1.0 else float("inf")
    if np.isfinite(q):
        x = x.clamp(-q, q)
    return [torch.nn.functional.normalize(layer, dim=-1) for layer in x], q


def preprocess_features(
    x: np.ndarray | torch.Tensor, clamp_quantile: float = 0.95, clamp_method: str = "mean_per_sample"
) -> torch.Tensor:
    """One `(N, D)` set (a stack of one layer): clamp at its threshold, then L2-normalise each row."""
    layers, _ = preprocess_stack(x, clamp_quantile, clamp_method)
    return layers[0]


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
    vision_layers: np.ndarray,
    text_layers: np.ndarray,
    k: int = 10,
    clamp_quantile: float = 0.95,
    clamp_method: str = "mean_per_sample",
    return_thresholds: bool = False,
):
    """(Lv, Lt) mutual-kNN scores for layer stacks (Lv, N, Dv) and (Lt, N, Dt), each stack clamped at its one
    threshold. With `return_thresholds`, also the (vision, text) thresholds."""
    vis, qv = preprocess_stack(vision_layers, clamp_quantile, clamp_method)
    txt, qt = preprocess_stack(text_layers, clamp_quantile, clamp_method)
    m = np.array([[mutual_knn(v, t, k) for t in txt] for v in vis])
    return (m, (qv, qt)) if return_thresholds else m


def summarize_alignment(matrix: np.ndarray) -> dict:
    i, j = np.unravel_index(int(np.argmax(matrix)), matrix.shape)
    return {"alignment": float(matrix[i, j]), "best_vision_layer": int(i), "best_text_layer": int(j)}


@torch.no_grad()
def language_features(
    model, tokenizer, captions: list[str], batch_size: int = 32, device: str = "cpu", max_length: int | None = None
) -> np.ndarray:
    """(L + 1, N, D): mean over each caption's tokens (padding excluded) of every hidden state, embeddings included.

    Captions are kept whole unless `max_length` (tokens) is given, as in the reference, which does not truncate.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    trunc = {"truncation": True, "max_length": max_length} if max_length else {}
    out = None
    for s in tqdm(range(0, len(captions), batch_size), desc="caption features"):
        batch = tokenizer(captions[s : s + batch_size], return_tensors="pt", padding=True, **trunc).to(device)
        hs = model(**batch, output_hidden_states=True, return_dict=True).hidden_states
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = torch.stack([(h.float() * mask).sum(1) / mask.sum(1).clamp(min=1) for h in hs])
        if out is None:
            out = np.zeros((pooled.shape[0], len(captions), pooled.shape[-1]), dtype=np.float32)
        out[:, s : s + pooled.shape[1]] = pooled.cpu().numpy()
    return out


def check_alignment_seeds(seeds, max_samples: int | None, num_pairs: int | None = None) -> None:
    """Several seeds only make sense when each draws its own subset of pairs; otherwise they repeat one number."""
    draws = max_samples is not None and (num_pairs is None or max_samples < num_pairs)
    if len(seeds) > 1 and not draws:
        raise ValueError(
            f"alignment with seeds {list(seeds)} but alignment_max_samples={max_samples}"
            + (f" (of {num_pairs} pairs)" if num_pairs is not None else "")
            + ": every seed would use all pairs and give the same number. Set --alignment_max_samples below the "
            "number of pairs to draw a subset per seed, or pass one seed; the paper's seeds are separately trained "
            "encoders -- pass each as a --model_name_or_path."
        )


def alignment_over_seeds(
    vision_layers: np.ndarray,
    text_layers: np.ndarray,
    k: int = 10,
    seeds: tuple[int, ...] = (0,),
    max_samples: int | None = None,
    clamp_quantile: float = 0.95,
    clamp_method: str = "mean_per_sample",
) -> dict:
    """Max-over-layer-pairs alignment per seed. A seed draws `max_samples` pairs (thresholds are then computed on that
    subset, as if it were the dataset); without `max_samples` all pairs are used and only one seed is accepted."""
    n = vision_layers.shape[1]
    check_alignment_seeds(seeds, max_samples, n)
    per_seed = []
    for seed in seeds:
        idx = np.arange(n)
        if max_samples is not None and max_samples < n:
            idx = np.sort(np.random.default_rng(seed).choice(n, max_samples, replace=False))
        m, (qv, qt) = alignment_matrix(
            vision_layers[:, idx], text_layers[:, idx], k, clamp_quantile, clamp_method, return_thresholds=True
        )
        per_seed.append(
            {
                "seed": seed,
                **summarize_alignment(m),
                "num_pairs": int(len(idx)),
                "clamp_threshold": {"vision": qv, "text": qt},
                "matrix": m.tolist(),
            }
        )
    vals = np.array([r["alignment"] for r in per_seed])
    return {
        "alignment_mean": float(vals.mean()),
        "alignment_std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
        "per_seed": per_seed,
    }
