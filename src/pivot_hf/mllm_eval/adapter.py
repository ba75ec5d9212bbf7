"""lmms-eval model adapter for Pivot checkpoints (and any transformers image-text-to-text LLaVA-like checkpoint).

`PivotLMM` implements lmms-eval's `lmms` interface: `generate_until` (greedy, batched, the LLM's chat template via the
processor) and `loglikelihood` (batched teacher forcing). Requests are lmms-eval `Instance`s whose `args` are
`(context, gen_kwargs | target, doc_to_visual, doc_id, task, split)`; documents are looked up in `self.task_dict`,
which the evaluator (lmms-eval's, or `local_runner.run_task`) fills before sending requests.

When lmms-eval is installed the class subclasses `lmms_eval.api.model.lmms` (its registry checks that); without it,
the same class is a plain object, so the offline runner and the tests use the very same code.
"""

import logging
from collections import defaultdict
from typing import Any

import torch

from .registration import LMMS_EVAL_AVAILABLE, lmms_base


logger = logging.getLogger(__name__)

# lmms-eval tasks pass these through `generation_kwargs`; they are sampling or LLaVA-repo knobs, not generate() args.
_IGNORED_GEN_KWARGS = ("temperature", "top_p", "top_k", "do_sample", "num_beams", "image_aspect_ratio", "until")


def _dtype(value: str | torch.dtype | None) -> torch.dtype | str:
    if value is None or value == "auto" or isinstance(value, torch.dtype):
        return value or "auto"
    return getattr(torch, str(value))


def _as_bool(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


class PivotLMM(lmms_base()):
    """A Pivot MLLM checkpoint behind lmms-eval's model interface (registered as `pivot`).

    Args (lmms-eval `--model_args key=value,...`):
        pretrained: checkpoint folder or Hub id (a Pivot checkpoint, or any LLaVA-like image-text-to-text model).
        device: `cuda`, `cuda:0`, `cpu`; default: cuda when available. Under `accelerate launch` each process takes
            its local GPU and lmms-eval shards the requests across processes.
        dtype: `bfloat16`, `float16`, `float32` or `auto` (the checkpoint's).
        batch_size: prompts per `generate()` call (left padding) and per loglikelihood forward.
        max_new_tokens: upper bound on tokens generated when a task asks for more (None = the task's own value).
        use_chat_template: wrap prompts with the processor's chat template (the LLM's, e.g. Qwen ChatML).
        system_prompt: optional system message; None keeps the checkpoint's template default.
        trust_remote_code, attn_implementation: passed to `from_pretrained`.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str | torch.dtype | None = "auto",
        batch_size: int | str = 1,
        max_new_tokens: int | None = None,
        use_chat_template: bool | str = True,
        system_prompt: str | None = None,
        trust_remote_code: bool | str = False,
        attn_implementation: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        # Harness-level options lmms-eval forwards to every model (max_batch_size, ...); nothing to do with them.
        if kwargs:
            logger.info("PivotLMM ignores model args %s", sorted(kwargs))
        from transformers import AutoModelForImageTextToText, AutoProcessor

        import pivot_hf  # noqa: F401  (registers the Pivot classes with the Auto classes)

        self._rank, self._world_size = 0, 1
        self.task_dict: dict = getattr(self, "task_dict", {}) or {}
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            from accelerate import PartialState

            state = PartialState()
            if state.num_processes > 1:
                # Data parallel: one full model per process; lmms-eval splits requests by rank and gathers results.
                self._rank, self._world_size = state.process_index, state.num_processes
                device = str(state.device)
        except Exception:  # accelerate without a distributed launcher: single process
            pass
        self._device = torch.device(device)
        trust_remote_code = _as_bool(trust_remote_code)
        # Hub kernels off (transformers 5.25+ defaults to on): the paper's numbers are measured without them.
        load_kwargs = {"dtype": _dtype(dtype), "trust_remote_code": trust_remote_code, "use_kernels": False}
        if attn_implementation:
            load_kwargs["attn_implementation"] = attn_implementation
        self.model = AutoModelForImageTextToText.from_pretrained(pretrained, **load_kwargs).to(self._device).eval()
        self.processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=trust_remote_code)
        if getattr(self.model.config, "model_type", None) == "pivot":
            from ..trainer.preflight import check_model_processor

            # A checkpoint whose model and processor disagree (image token, vocabulary) is refused before any request.
            check_model_processor(self.model.config, self.processor, str(pretrained))
        self.tokenizer = self.processor.tokenizer
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens) if max_new_tokens not in (None, "None", "") else None
        self.use_chat_template = _as_bool(use_chat_template)
        self.system_prompt = system_prompt
        self.image_token = getattr(self.processor, "image_token", "<image>")
        self._warned_sampling = False

    # ----------------------------------------------------------------------------------------------- lmms interface
    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def _doc(self, task: str, split: str, doc_id: int):
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual, doc_id: int, task: str, split: str) -> list:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self._doc(task, split, doc_id)) or []
        visuals = visuals if isinstance(visuals, (list, tuple)) else [visuals]
        images = []
        for visual in visuals:
            if not hasattr(visual, "convert"):
                raise NotImplementedError(f"PivotLMM takes images only; task {task!r} gave {type(visual).__name__}")
            images.append(visual.convert("RGB"))
        return images

    def build_prompt(self, context: str, num_images: int) -> str:
        """The text fed to the processor: the chat template of the LLM with the images first, as in LLaVA training."""
        # Contexts that already carry `<image>` placeholders (interleaved tasks) keep them where they are.
        inline = context.count(self.image_token)
        missing = max(num_images - inline, 0)
        if self.use_chat_template and getattr(self.processor, "chat_template", None):
            content = [{"type": "image"} for _ in range(missing)] + [{"type": "text", "text": context}]
            messages = [{"role": "user", "content": content}]
            if self.system_prompt:
                messages.insert(0, {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return f"{self.image_token}\n" * missing + context

    def _encode(self, prompts: list[str], images: list[list], padding_side: str) -> dict:
        flat = [image for per_prompt in images for image in per_prompt]
        self.tokenizer.padding_side = padding_side
        batch = self.processor(images=flat or None, text=prompts, return_tensors="pt", padding=True)
        return {k: v.to(self._device) if hasattr(v, "to") else v for k, v in batch.items()}

    @torch.inference_mode()
    def generate_until(self, requests) -> list[str]:
        """Greedy generation, `batch_size` prompts at a time, cut at the task's `until` strings."""
        outputs: list[str | None] = [None] * len(requests)
        # Requests sharing generation kwargs can share a generate() call; longest prompts first keeps padding low.
        groups: dict[str, list[int]] = defaultdict(list)
        for index, request in enumerate(requests):
            groups[repr(sorted((request.args[1] or {}).items()))].append(index)
        for indices in groups.values():
            indices.sort(key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                for index, text in zip(chunk, self._generate_chunk([requests[i] for i in chunk])):
                    outputs[index] = text
                    context, gen_kwargs = requests[index].args[:2]
                    self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return outputs

    def _generate_chunk(self, chunk) -> list[str]:
        gen_kwargs = dict(chunk[0].args[1] or {})
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        if not self._warned_sampling and (
            float(gen_kwargs.get("temperature", 0) or 0) > 0 or gen_kwargs.get("do_sample")
        ):
            logger.warning(
                "PivotLMM decodes greedily (the paper's protocol); the task's sampling settings are ignored."
            )
            self._warned_sampling = True
        max_new_tokens = int(gen_kwargs.get("max_new_tokens", 128))
        if self.max_new_tokens is not None:
            max_new_tokens = min(max_new_tokens, self.max_new_tokens)
        images = [self._visuals(*request.args[2:6]) for request in chunk]
        prompts = [self.build_prompt(request.args[0], len(imgs)) for request, imgs in zip(chunk, images)]
        batch = self._encode(prompts, images, padding_side="left")
        extra = {k: v for k, v in gen_kwargs.items() if k not in _IGNORED_GEN_KWARGS and k != "max_new_tokens"}
        pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        )
        generated = self.model.generate(
            **batch,
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            temperature=None,
            top_p=None,
            top_k=None,
            **extra,
        )
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [self._cut(text, until) for text in texts]

    @staticmethod
    def _cut(text: str, until: list[str]) -> str:
        for stop in until:
            if stop:
                text = text.split(stop, 1)[0]
        return text

    @torch.inference_mode()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """Sum of log-probabilities of each continuation given the (chat-templated) context and images, and whether
        greedy decoding would have produced it token by token."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].args[0]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            for index, result in zip(chunk, self._loglikelihood_chunk([requests[i] for i in chunk])):
                results[index] = result
                self.cache_hook.add_partial("loglikelihood", requests[index].args[:2], result)
        return results

    def _loglikelihood_chunk(self, chunk) -> list[tuple[float, bool]]:
        prompts, continuations, images = [], [], []
        for request in chunk:
            context, target, doc_to_visual, doc_id, task, split = request.args[:6]
            # Multiple-choice tasks pass the continuation string; loglikelihood tasks pass doc_to_target.
            continuation = target(self._doc(task, split, doc_id)) if callable(target) else target
            imgs = self._visuals(doc_to_visual, doc_id, task, split)
            prompts.append(self.build_prompt(context, len(imgs)))
            continuations.append(str(continuation))
            images.append(imgs)
        # The prompt goes through the processor (image tokens expanded, pixel values); the continuation is tokenized on
        # its own and appended, so its tokens are exactly the scored ones whatever the tokenizer merges at the seam.
        batch = self._encode(prompts, images, padding_side="right")
        prompt_lengths = batch["attention_mask"].sum(dim=1).tolist()
        cont_ids = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        total = max(p + len(c) for p, c in zip(prompt_lengths, cont_ids))
        input_ids = torch.full((len(chunk), total), pad_id, dtype=torch.long, device=self._device)
        attention_mask = torch.zeros_like(input_ids)
        for row, (length, ids) in enumerate(zip(prompt_lengths, cont_ids)):
            input_ids[row, :length] = batch["input_ids"][row, :length]
            input_ids[row, length : length + len(ids)] = torch.tensor(ids, dtype=torch.long, device=self._device)
            attention_mask[row, : length + len(ids)] = 1
        inputs = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask")}
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, **inputs).logits.float()
        log_probs = torch.log_softmax(logits, dim=-1)
        results = []
        for row, (length, ids) in enumerate(zip(prompt_lengths, cont_ids)):
            if not ids:
                results.append((0.0, True))
                continue
            # Position t predicts token t + 1: continuation tokens at [length, length + n) come from [length - 1, ...).
            positions = torch.arange(length - 1, length - 1 + len(ids), device=self._device)
            targets = torch.tensor(ids, device=self._device)
            token_log_probs = log_probs[row, positions, targets]
            greedy = bool((log_probs[row, positions].argmax(dim=-1) == targets).all())
            results.append((float(token_log_probs.sum()), greedy))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("PivotLMM does not implement multi-round generation (none of the 16 tasks uses it).")


__all__ = ["LMMS_EVAL_AVAILABLE", "PivotLMM"]
