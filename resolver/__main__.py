"""The `ipseckey-resolver` program (the console script, the installed wrapper, `python -m
resolver`): SIGHUP is held before anything else is imported (resolver/service/sighup.py), then the
command line runs (resolver/cli.py). Importing the daemon's modules takes about 0.3 s; a
SIGHUP in that time must not end the process."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from resolver.service import sighup


def main(argv: Sequence[str] | None = None) -> int:
    """The program's entry point: hold SIGHUP, then hand over to resolver.cli.main."""
    sighup.hold()
    from resolver.cli import main as cli_main  # late on purpose: after the hold

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
