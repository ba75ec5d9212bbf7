"""lmms-eval's plugin layout (`LMMS_EVAL_PLUGINS=pivot_hf.mllm_eval`): model name -> class in `models/<name>.py`."""

AVAILABLE_MODELS = {"pivot": "PivotLMM"}
