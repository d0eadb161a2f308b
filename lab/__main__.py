"""`python -m lab up|down|status|exec HOST -- CMD...|demo`."""

from __future__ import annotations

import argparse
import os
import sys

from lab.core import Lab
from lab.net import LabError


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run one lab command; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m lab", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up", help="bring the lab up (down first if stale)")
    sub.add_parser("down", help="remove everything the lab made (keeps the key cache)")
    sub.add_parser("status", help="namespaces, daemons, blackhole routes")
    ex = sub.add_parser("exec", help="run a command inside a lab host: exec HOST -- CMD...")
    ex.add_argument("host")
    ex.add_argument("command", nargs=argparse.REMAINDER)
    sub.add_parser("demo", help="up, DNS answer, alice<->bob tunnel, ESP capture, SAs, down")
    args = p.parse_args(argv)
    try:
        lab = Lab()
        if args.cmd == "up":
            took = lab.up()
            print(f"lab up in {took:.2f} s ({lab.prefix}*, state {lab.state_dir})")
        elif args.cmd == "down":
            print(f"lab down in {lab.down():.2f} s")
        elif args.cmd == "status":
            print(lab.status())
        elif args.cmd == "exec":
            cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
            if not cmd:
                p.error("exec needs a command: exec HOST -- CMD...")
            # Replace this process: the command's exit status and terminal are the user's.
            os.execvp("ip", ["ip", "netns", "exec", lab.ns(args.host), *cmd])  # noqa: S606
        elif args.cmd == "demo":
            from lab.demo import run_demo

            return run_demo(lab)
    except LabError as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
