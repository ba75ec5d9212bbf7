"""SFT collator with loss on every assistant turn of multi-turn image conversations (LLaVA / OneVision rows).

TRL's vision collator can mask non-assistant tokens only through `{% generation %}` markers in the chat template,
which LLM templates (Qwen's ChatML, Llama's) do not have. Here the assistant turns are located from the rendered
text instead: each turn's span is the difference between the conversation rendered up to that turn (with the
generation prompt) and rendered through it, so the LLM's own template decides the boundaries, whatever it is. The
spans are carried into token space through the processor's image-token expansion offsets and the tokenizer's
offsets, so the count of image tokens (fixed or NaFlex) never shifts a label.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from trl.data_utils import prepare_multimodal_messages


@dataclass
class AssistantTurnsVisionCollator:
    """Collate `{"messages", "images"}` rows; labels are the assistant turns (content + end-of-turn token)."""

    processor: Any
    return_tensors: str = "pt"

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        texts, images, spans = [], [], []
        for example in examples:
            row_images = example.get("images") or ([example["image"]] if example.get("image") is not None else [])
            messages = prepare_multimodal_messages(example["messages"], images=row_images)
            text, row_spans = self._render_with_spans(messages)
            texts.append(text)
            spans.append(row_spans)
            images.append(row_images)
        flat_images = [image for row in images for image in row] or None
        batch = self.processor(
            images=flat_images,
            text=texts,
            padding=True,
            padding_side="right",
            add_special_tokens=False,
            return_offsets_mapping=True,
            return_text_replacement_offsets=True,
            return_tensors=self.return_tensors,
        )
        offsets = batch.pop("offset_mapping").tolist()
        replacements = batch.pop("text_replacement_offsets", None) or [[] for _ in texts]
        labels = torch.full_like(batch["input_ids"], -100)
        for row, (row_offsets, row_spans) in enumerate(zip(offsets, spans)):
            expanded = [self._shift(span, replacements[row]) for span in row_spans]
            for position, (start, end) in enumerate(row_offsets):
                # Overlap, not containment: a token that straddles the turn's start (the template's newline merged
                # with an answer that starts with a newline) carries answer text, so it is a label.
                if batch["attention_mask"][row, position] and any(start < hi and end > lo for lo, hi in expanded):
                    labels[row, position] = batch["input_ids"][row, position]
        batch["labels"] = labels
        return dict(batch)

    def _render_with_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        render = self.processor.apply_chat_template
        full = render(messages, tokenize=False)
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = render(messages[:index], tokenize=False, add_generation_prompt=True) if index else ""
            through = render(messages[: index + 1], tokenize=False)
            if not (full.startswith(through) and through.startswith(before)):
                raise ValueError(
                    "The chat template does not render conversations incrementally (a prefix of the conversation "
                    "is not a prefix of its rendering), so assistant turns cannot be located. Use "
                    "`sft_loss_on: last_assistant_turn` for this LLM."
                )
            # Trailing whitespace after the end-of-turn token belongs to the template, not to the answer.
            spans.append((len(before), len(through.rstrip())))
        return full, spans

    @staticmethod
    def _shift(span: tuple[int, int], replacements: list[dict]) -> tuple[int, int]:
        """Map a character span of the text as rendered to the text after `<image>` expansion."""
        start, end = span
        delta_start = delta_end = 0
        for replacement in replacements:
            old_start, old_end = replacement["span"]
            growth = (replacement["new_span"][1] - replacement["new_span"][0]) - (old_end - old_start)
            if old_end <= span[0]:
                delta_start += growth
            if old_end <= span[1]:
                delta_end += growth
        return start + delta_start, end + delta_end


__all__ = ["AssistantTurnsVisionCollator"]
