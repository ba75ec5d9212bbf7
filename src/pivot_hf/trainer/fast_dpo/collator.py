"""The collator wrapper that carries cached reference log-probs along with their rows."""

from __future__ import annotations

from typing import Any

import torch

from .reference_cache import REF_COLUMNS


class _RefLogpsCollator:
    """Wraps the vision collator so cached reference log-probs ride along with their rows."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        cached = {name: [example.pop(name) for example in examples if name in example] for name in REF_COLUMNS}
        batch = self.inner(examples)
        for name, values in cached.items():
            if values and len(values) == len(examples):
                batch[name] = torch.tensor(values, dtype=torch.float32)
        return batch

    def __getattr__(self, name):
        return getattr(self.inner, name)
