"""A small statistical profiler for the resolver process (py-spy is not installed here).

Usage: python bench/sampler.py OUT.json [--interval 0.001] [--on-signal] -- -m resolver ...

With --on-signal, sampling starts at the first SIGUSR2 (so start-up and warm-up stay out).

Why this and not cProfile alone: cProfile charges every Python call, and dnspython's parsing
is thousands of tiny calls, so its profile overstates parsing against C work (signature
checks, sockets). This samples instead: ITIMER_PROF fires after every `interval` seconds of
CPU time the process uses (user + system), and the SIGPROF handler records the Python stack
that was running. Time in a C function (a socket call, an ECDSA verify) lands on the Python
function that called it, which is what we want to read. When the process is idle (waiting in
epoll) the timer does not run, so samples are proportional to CPU spent.

Cost: one stack walk per sample (a few microseconds; about 1 % at 1 kHz), plus one wake-up of
asyncio's self-pipe per signal (asyncio installs a wakeup fd for its own signal handlers).

The samples are written as JSON ({"interval": s, "stacks": [[count, [frame, ...]], ...]},
innermost frame first) when the program exits, including on SIGTERM through its own exit.
"""

from __future__ import annotations

import argparse
import json
import runpy
import signal
import sys
from collections import Counter
from types import FrameType


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--interval", type=float, default=0.001)
    ap.add_argument("--on-signal", action="store_true", help="start at SIGUSR2")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:cut])
    rest = argv[cut + 1:]
    if len(rest) < 2 or rest[0] != "-m":
        sys.exit("sampler: give -- -m MODULE [ARGS...]")
    stacks: Counter[tuple[str, ...]] = Counter()
    names: dict[object, str] = {}

    def on_sample(_signum: int, frame: FrameType | None) -> None:
        stack = []
        while frame is not None:
            code = frame.f_code
            label = names.get(code)
            if label is None:
                path = code.co_filename
                short = path.split("site-packages/")[-1].split("/work/wt/")[-1]
                label = names[code] = f"{code.co_name} ({short}:{code.co_firstlineno})"
            stack.append(label)
            frame = frame.f_back
        stacks[tuple(stack)] += 1

    def start(*_: object) -> None:
        signal.setitimer(signal.ITIMER_PROF, args.interval, args.interval)

    signal.signal(signal.SIGPROF, on_sample)
    if args.on_signal:
        signal.signal(signal.SIGUSR2, start)
    else:
        start()
    sys.argv = [rest[1], *rest[2:]]
    try:
        runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code
    else:
        code = 0
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        with open(args.out, "w") as f:
            json.dump({"interval": args.interval,
                       "stacks": [[n, list(s)] for s, n in stacks.items()]}, f)
    return code if isinstance(code, int) else 1


def report(path: str, top: int = 25, strip: tuple[str, ...] = ()) -> str:
    """The top of a sample file: self time and inclusive time per function, in %."""
    data = json.loads(open(path).read())
    total = sum(n for n, _ in data["stacks"]) or 1
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    for n, stack in data["stacks"]:
        if stack:
            own[stack[0]] += n
        for label in set(stack):
            incl[label] += n
    # The kernel's CPU-time timer ticks at HZ (250 here), so a sample stands for 4 ms
    # whatever the interval asked: read shares, not seconds.
    lines = [f"{total} samples",
             f"{'self %':>7}  function (innermost: where the CPU was)"]
    lines += [f"{100 * n / total:7.1f}  {label}" for label, n in own.most_common(top)]
    lines += ["", f"{'incl %':>7}  function (with everything it called)"]
    shown = 0
    for label, n in incl.most_common():
        if any(s in label for s in strip):
            continue
        lines.append(f"{100 * n / total:7.1f}  {label}")
        shown += 1
        if shown >= top:
            break
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
