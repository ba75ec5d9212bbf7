"""Fast PIVOT DPO (work in progress by the performance track; see issue 8).

`FastDPOMixin` is mixed into `PivotDPOTrainer` before TRL's `DPOTrainer`. It will hold the shared-image,
shared-prefix and cached-reference-log-prob paths.
"""


class FastDPOMixin:
    """Mixed into PivotDPOTrainer ahead of trl.DPOTrainer; overrides land here."""
