"""Print the installed versions of our dependencies, and where they differ from constraints.txt
(the versions of the last green run, offered to users for exact reproduction)."""

from __future__ import annotations

import re
from importlib.metadata import distributions
from pathlib import Path

pinned = {}
for line in (Path(__file__).resolve().parents[1] / "constraints.txt").read_text().splitlines():
    if m := re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line):
        pinned[m[1].lower().replace("_", "-")] = m[2]
# a local build label (torch's "+cpu") matches the pin, as pip's == does
installed = {d.metadata["Name"].lower().replace("_", "-"): d.version.split("+")[0] for d in distributions()}
names = ["torch", "lightning", "transformers", "diffusers", "torchmetrics", "jsonargparse", "peft", "numpy"]
print("versions under test: " + ", ".join(f"{n} {installed.get(n, '-')}" for n in names))
newer = sorted(f"{n} {pinned[n]} -> {v}" for n, v in installed.items() if n in pinned and pinned[n] != v)
if newer:
    print("differs from constraints.txt (the last green run): " + "; ".join(newer))
