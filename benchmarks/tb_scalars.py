"""Print a TensorBoard run's scalars as a table: python benchmarks/tb_scalars.py LOGDIR [TAG ...]"""

from __future__ import annotations

import sys
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


if __name__ == "__main__":
    scalars = read_scalars(sys.argv[1])
    tags = sys.argv[2:] or sorted(scalars)
    for tag in tags:
        rows = scalars.get(tag, [])
        if not rows:
            continue
        t0 = min(r[2] for v in scalars.values() for r in v)
        print(f"{tag}: " + ", ".join(f"{s}:{v:.3f}@{w - t0:.0f}s" for s, v, w in rows[-12:]))
