"""Conversion report: every input row is either kept or skipped with a counted reason.

The report is the audit trail of a conversion. Its invariant, checked by `ConversionReport.check()`, is
`kept + sum(skipped.values()) == total`: no row may vanish silently. `converted` counts repairs applied to kept rows
(a row can receive several repairs, so these counts do not enter the invariant).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


# Reasons a row can be skipped. Keeping them in one place makes the report readable and the tests exhaustive.
SKIP_REASONS = {
    "broken_json": "the line / element is not valid JSON",
    "not_an_object": "the JSON value is not an object",
    "invalid_text": "a required text field is missing, empty or not a string",
    "bad_conversation": "the conversation has no user/assistant exchange or unknown roles",
    "no_image": "the row has no image (the MMPR recipe keeps single-image rows only)",
    "multi_image": "the row has several images (single-image rows only)",
    "invalid_image_field": "the image field is not a string path (or list of them)",
    "image_token_in_response": "chosen/rejected/assistant text contains <image>",
    "special_token_in_response": "an answer (chosen/rejected/assistant turn) contains a chat control token such as "
    "<|im_end|> written as text: it would become a real end of turn (prompts are escaped instead)",
    "chosen_equals_rejected": "chosen and rejected are identical: no preference signal",
    "path_escapes_root": "the image path resolves outside the image root (.., absolute path, or a symlink to elsewhere: "
    "point the image root / `image_folder` at the real location)",
    "image_missing": "the image file does not exist",
    "image_unreadable": "the image file is truncated, corrupt or not an image",
    "image_too_large": "the image has more pixels than max_image_pixels (decompression-bomb guard)",
    "image_too_small": "the image is smaller than min_image_side",
    "image_is_url": "the image is a URL: nothing is fetched during training (download the files, point the rows at them)",
    "image_inline_data": "the image is a data: URI or base64 string (store the bytes in a `datasets.Image` column)",
    "image_unreadable_at_collate": "the image passed the check but could not be read when its batch was built (a "
    "file deleted or replaced mid-run); the row was left out of that batch",
    "answer_not_checkable": "the answer extracted from `chosen` is longer than max_solution_words: free-form text "
    "cannot be checked by exact match (GRPO)",
    "missing_answer": "a GRPO row has no ground truth (missing, null, empty or 'None'): it cannot be rewarded",
    "too_many_text_tokens": "prompt + chosen exceed max_text_tokens",
    "exceeds_max_length": "text tokens + image tokens cannot fit max_length",
    "variant_filtered": "removed by the selected paper variant (Under30 / NoThink / new-distribution ratio)",
    "not_sampled": "valid or unchecked row left out by the seeded sample of num_samples",
}


@dataclass
class ConversionReport:
    """Counts of kept / skipped / converted rows: the record id of every skipped row (rows left out by sampling
    and repairs: up to `max_examples` example ids per reason)."""

    source: str = ""
    total: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    converted: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    max_examples: int = 5

    def _example(self, key: str, record_id: str | None) -> None:
        if record_id is None:
            return
        ids = self.examples.setdefault(key, [])
        # Every skipped row is named (the audit trail of a run); repairs and rows left out by sampling keep examples.
        named = key.startswith("skipped:") and key != "skipped:not_sampled"
        if named or len(ids) < self.max_examples:
            ids.append(str(record_id))

    def add_total(self, n: int = 1) -> None:
        self.total += n

    def keep(self, n: int = 1) -> None:
        self.kept += n

    def skip(self, reason: str, record_id: str | None = None, n: int = 1) -> None:
        """Count `n` rows skipped for `reason` (one of `SKIP_REASONS`)."""
        if reason not in SKIP_REASONS:
            raise KeyError(f"unknown skip reason {reason!r}")
        self.skipped[reason] += n
        self._example(f"skipped:{reason}", record_id)

    def convert(self, what: str, record_id: str | None = None) -> None:
        """Count one repair applied to a kept row (e.g. `image_token_prepended`, `image_mode_CMYK`)."""
        self.converted[what] += 1
        self._example(f"converted:{what}", record_id)

    def move_kept_to_skipped(self, reason: str, record_ids: list[str] | None = None, n: int | None = None) -> None:
        """Re-label rows already counted as kept (a later filter dropped them)."""
        record_ids = record_ids or []
        n = len(record_ids) if n is None else n
        self.kept -= n
        self.skipped[reason] += n
        for rid in record_ids:
            self._example(f"skipped:{reason}", rid)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def check(self) -> bool:
        """The accounting invariant: every input row is kept or skipped exactly once."""
        return self.kept + self.num_skipped == self.total

    def merge(self, other: ConversionReport) -> None:
        """Fold another report (e.g. one file of a mixture) into this one."""
        self.total += other.total
        self.kept += other.kept
        self.skipped.update(other.skipped)
        self.converted.update(other.converted)
        for key, ids in other.examples.items():
            for rid in ids:
                self._example(key, rid)
        self.notes.extend(other.notes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "total": self.total,
            "kept": self.kept,
            "skipped_total": self.num_skipped,
            "skipped": dict(sorted(self.skipped.items())),
            "converted": dict(sorted(self.converted.items())),
            "examples": self.examples,
            "notes": self.notes,
            "settings": self.settings,
            "invariant_ok": self.check(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False, default=str)

    def to_markdown(self) -> str:
        """A readable summary for humans (and for the PR description of a data conversion)."""
        lines = [
            f"# Data conversion report: `{self.source}`",
            "",
            f"- total input rows: **{self.total}**",
            f"- kept: **{self.kept}**",
            f"- skipped: **{self.num_skipped}**",
            f"- invariant kept + skipped == total: **{'OK' if self.check() else 'BROKEN'}**",
            "",
        ]
        if self.skipped:
            lines += ["## Skipped", "", "| reason | rows | meaning | example ids |", "|---|---:|---|---|"]
            for reason, count in sorted(self.skipped.items(), key=lambda kv: -kv[1]):
                all_ids = self.examples.get(f"skipped:{reason}", [])
                ids = ", ".join(all_ids[: self.max_examples])
                if len(all_ids) > self.max_examples:
                    ids += f" (+{len(all_ids) - self.max_examples} more in the JSON report)"
                lines.append(f"| `{reason}` | {count} | {SKIP_REASONS.get(reason, '')} | {ids} |")
            lines.append("")
        if self.converted:
            lines += ["## Converted (repairs on kept rows)", "", "| repair | rows | example ids |", "|---|---:|---|"]
            for what, count in sorted(self.converted.items(), key=lambda kv: -kv[1]):
                ids = ", ".join(self.examples.get(f"converted:{what}", []))
                lines.append(f"| `{what}` | {count} | {ids} |")
            lines.append("")
        if self.notes:
            lines += ["## Notes", ""] + [f"- {note}" for note in self.notes] + [""]
        if self.settings:
            lines += ["## Settings", "", "```json", json.dumps(self.settings, indent=2, default=str), "```", ""]
        return "\n".join(lines)

    def save(self, output_dir: str, stem: str = "conversion_report") -> tuple[str, str]:
        """Write `<stem>.json` and `<stem>.md` into `output_dir`; return both paths."""
        os.makedirs(output_dir, exist_ok=True)
        json_path = os.path.join(output_dir, f"{stem}.json")
        md_path = os.path.join(output_dir, f"{stem}.md")
        with open(json_path, "w", encoding="utf-8") as f:
            f.write(self.to_json())
        with open(md_path, "w", encoding="utf-8") as f:
            f.write(self.to_markdown())
        return json_path, md_path
