"""`pivot-hf` console script (setup.py: `pivot-hf=pivot_hf.cli:main`).

Minimal dispatcher created by the data issue; other command groups can be added beside `data`.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: pivot-hf data {convert-mmpr,convert-llava,inspect} ...\n\ncommands:\n  data    convert / inspect data"
        )
        return 0
    if argv[0] == "data":
        from pivot_hf.data.cli import main as data_main

        return data_main(argv[1:])
    print(f"pivot-hf: unknown command {argv[0]!r} (known: data)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
