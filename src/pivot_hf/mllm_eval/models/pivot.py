"""`pivot` model for lmms-eval's plugin loader; the implementation lives in `pivot_hf.mllm_eval.adapter`."""

from ..adapter import PivotLMM


__all__ = ["PivotLMM"]
