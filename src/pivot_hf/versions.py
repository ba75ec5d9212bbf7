"""The tested version range of the stack pivot-hf runs on, and what a user outside it gets.

Policy (README, "Tested versions"):
- below a lower end: pip refuses (`setup.py` requires `>=` the lower end, which CI tests in `make test-compat`);
- inside the range: tested; `requirements/lock.txt` pins the newest end, which `make test` runs on;
- newer than the range but the same major release: installed as the user has it, never downgraded by pip (`setup.py`'s
  upper bounds sit at the next major release), with one warning at `import pivot_hf` naming the packages and the tested
  range. CI's `make test-compat` also runs the smoke subset on the newest releases the registry has, so a new release
  that breaks pivot-hf is found at the next submission, not by a user;
- the next major release: refused by pip until tested.

This module imports nothing heavy: `setup.py` reads `TESTED_RANGES` from its text, and the check reads installed
versions from package metadata without importing the packages.
"""

import re
import sys
import warnings
from importlib.metadata import PackageNotFoundError, version


# `package: (lowest tested version, first untested minor)`. The lower ends are what requirements/lower.txt pins; the
# lock (requirements/lock.txt) lies inside. transformers' range is not here: it is `TESTED_TRANSFORMERS_RANGE` in
# configuration_pivot.py, which travels with checkpoints and warns by itself (once, also without pivot_hf).
TESTED_RANGES = {
    "torch": ("2.13", "2.14"),
    "trl": ("1.16", "1.17"),
    "accelerate": ("1.15", "1.17"),
    "datasets": ("5.0.1", "5.3"),
    "peft": ("0.21", "0.22"),
    "huggingface_hub": ("1.33", "2.5"),
    "tokenizers": ("0.23.2", "0.24"),
}


def _release(text: str) -> tuple[int, ...]:
    """`2.13.0+cpu` -> (2, 13, 0); a pre-release of a minor counts as that minor (its features are not tested)."""
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0].split("rc")[0])[:3])


def pip_requirement(name: str, tested_range: tuple[str, str]) -> str:
    """What `setup.py` asks pip for: `>=` the lowest tested version, `<` the major release after the newest tested one
    (`("5.18", "5.26")` -> `transformers>=5.18,<6`; `("1.33", "2.5")` -> `<3`; `("5.18", "6.0")`: 5.x only, `<6`)."""
    lower, first_untested = tested_range
    major, minor = _release(first_untested)[:2]
    return f"{name}>={lower},<{major + 1 if minor > 0 else major}"


def untested_versions(
    installed: dict[str, str] | None = None, ranges: dict[str, tuple[str, str]] | None = None
) -> dict[str, str]:
    """`{package: installed version}` for every ranged package installed at a version newer than its tested range.

    `installed` (default: read from package metadata) maps package names to versions; missing packages are skipped.
    `ranges` defaults to `TESTED_RANGES`.
    """
    ranges = TESTED_RANGES if ranges is None else ranges
    if installed is None:
        installed = {}
        for name in ranges:
            try:
                installed[name] = version(name.replace("_", "-"))
            except PackageNotFoundError:
                continue
    newer = {}
    for name, found in installed.items():
        if name in ranges and _release(found)[:2] >= _release(ranges[name][1])[:2]:
            newer[name] = found
    return newer


def untested_versions_message(
    installed: dict[str, str] | None = None, ranges: dict[str, tuple[str, str]] | None = None
) -> str | None:
    """The warning for packages newer than the tested range, or None when every installed one is inside it."""
    ranges = TESTED_RANGES if ranges is None else ranges
    newer = untested_versions(installed, ranges)
    if not newer:
        return None
    found = ", ".join(
        f"{name} {found} (tested >={ranges[name][0]},<{ranges[name][1]})" for name, found in sorted(newer.items())
    )
    return (
        f"pivot-hf has not been tested with {found}. They are used as installed (pip does not downgrade them); if "
        "something fails, install the tested versions with `pip install -c requirements/lock.txt -e .` from a "
        "pivot-hf checkout (or the ranges above), and please report the failure with the versions."
    )


def warn_if_untested_versions() -> None:
    """Warn once per process (at `import pivot_hf`) about every package newer than its tested range, transformers
    included; the model files' own transformers warning (for checkpoints loaded as remote code) is then not repeated.
    """
    from .configuration_pivot import TESTED_TRANSFORMERS_RANGE

    if getattr(sys, "_pivot_untested_versions_warned", False):
        return
    ranges = {"transformers": TESTED_TRANSFORMERS_RANGE, **TESTED_RANGES}
    newer = untested_versions(ranges=ranges)  # package metadata read once
    message = untested_versions_message(newer, ranges)
    if message is None:
        return
    sys._pivot_untested_versions_warned = True
    if "transformers" in newer:
        sys._pivot_untested_transformers_warned = True  # the flag configuration_pivot.py reads
    warnings.warn(message, UserWarning, stacklevel=3)


__all__ = [
    "TESTED_RANGES",
    "pip_requirement",
    "untested_versions",
    "untested_versions_message",
    "warn_if_untested_versions",
]
