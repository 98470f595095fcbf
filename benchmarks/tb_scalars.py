"""Print a TensorBoard run's scalars.

    python benchmarks/tb_scalars.py LOGDIR [TAG ...]              # the last 12 values of each tag
    python benchmarks/tb_scalars.py LOGDIR [TAG ...] --window 25  # means over windows of 25 steps
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float, float]]]:
    """tag -> [(step, value, wall_time)] over every event file under `logdir`."""
    out: dict[str, list] = {}
    for f in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value, e.wall_time) for e in acc.Scalars(tag))
    return out


def window_means(rows: list[tuple[int, float, float]], window: int) -> list[tuple[int, float]]:
    """(first step of the window, mean value) per window of `window` steps."""
    groups: dict[int, list[float]] = {}
    for step, value, _ in rows:
        groups.setdefault(step // window * window, []).append(value)
    return [(s, sum(v) / len(v)) for s, v in sorted(groups.items())]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("logdir")
    parser.add_argument("tags", nargs="*")
    parser.add_argument("--window", type=int, default=0, help="print means over windows of this many steps")
    args = parser.parse_args()
    scalars = read_scalars(args.logdir)
    if not scalars:
        raise SystemExit(f"no TensorBoard scalars under {args.logdir!r}")
    t0 = min(r[2] for v in scalars.values() for r in v)
    for tag in args.tags or sorted(scalars):
        rows = sorted(scalars.get(tag, []))
        if not rows:
            print(f"{tag}: (not logged)")
        elif args.window > 0:
            print(f"{tag}: " + ", ".join(f"{s}:{v:.3f}" for s, v in window_means(rows, args.window)))
        else:
            print(f"{tag}: " + ", ".join(f"{s}:{v:.3f}@{w - t0:.0f}s" for s, v, w in rows[-12:]))
