"""Atomic checkpoints (work in progress by the reliability track; see issue 9).

`AtomicCheckpointMixin` is mixed into pivot_hf's trainers ahead of the TRL trainer class.
"""


class AtomicCheckpointMixin:
    """Mixed into PivotSFTTrainer / PivotDPOTrainer ahead of the TRL trainer; overrides land here."""
