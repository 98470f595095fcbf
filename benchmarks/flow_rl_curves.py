"""GenEval against CPU minutes: score the policy snapshots of flow RL runs, plot one curve per method.

    python benchmarks/flow_rl_curves.py --warm WARM_START_FOLDER --out benchmarks/figures/flow_rl_curves.png \
        "FlowGRPO=runs/b20_fg_s0/snapshots,runs/b20_fg_s1/snapshots" \
        "DiffusionNFT=runs/b20_nft_s0/snapshots" [--samples 4] [--target 0.65]

Each folder is what `PolicySnapshots` wrote (`index.json` and one `save_pretrained` folder per
CPU-minute mark). Every snapshot is scored on the held-out prompts as `evaluate_flow.py` scores
(`--samples` ODE images per prompt, 20 steps, no CFG); scores are cached in the snapshot folder
(`geneval-<samples>.json`), so a rerun only scores what is new. The warm start is the point at 0
CPU minutes of every curve. Prints a table (mean and range over seeds at each mark) and, per
method, the CPU minutes its mean curve first reaches `--target` (linear between marks): the
efficiency comparison "minutes to reach FlowGRPO's 20-minute score".
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from evaluate_flow import evaluate_flow  # noqa: E402  (the sibling script)
from unirl_lightning.data import OnPolicyDataModule  # noqa: E402
from unirl_lightning.models.flow import TinyFlowModel  # noqa: E402


def score(folder: Path, specs: list[dict], samples: int) -> dict[str, float]:
    """Held-out GenEval of one saved policy, cached beside its weights."""
    cache = folder / f"geneval-{samples}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    result = evaluate_flow(TinyFlowModel.from_pretrained(folder).eval(), specs, samples, steps=20)
    cache.write_text(json.dumps(result, indent=1))
    return result


def run_curve(snapshots: Path, specs: list[dict], samples: int) -> list[tuple[float, float]]:
    """`[(cpu_minutes, GenEval)]` of one run's snapshots, in order."""
    index = snapshots / "index.json"
    if not index.exists():
        raise FileNotFoundError(f"{index} not found: is {snapshots} a PolicySnapshots folder?")
    return [
        (e["cpu_minutes"], score(snapshots / e["folder"], specs, samples)["overall"])
        for e in json.loads(index.read_text())
    ]


def at_marks(curve: list[tuple[float, float]], every: float) -> dict[int, float]:
    """The curve at each mark k * `every`: the snapshot nearest it (snapshots land just past their
    mark; the end of a 20-minute run counts as the 20-minute mark), the first one if two round alike."""
    out: dict[int, float] = {}
    for minutes, value in curve:
        out.setdefault(round(minutes / every), value)
    return out


def minutes_to_reach(points: list[tuple[float, float]], target: float) -> float | None:
    """First CPU minute where the piecewise-linear curve reaches `target` (None if never)."""
    for (m0, v0), (m1, v1) in zip(points, points[1:]):
        if v1 >= target:
            return m0 if v0 >= target else m0 + (target - v0) / (v1 - v0) * (m1 - m0)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("methods", nargs="+", help="NAME=SNAPSHOTS[,SNAPSHOTS...] (one folder per seed)")
    ap.add_argument("--warm", required=True, help="the warm-start folder every run started from")
    ap.add_argument("--samples", type=int, default=4, help="images per held-out prompt")
    ap.add_argument("--every", type=float, default=2.0, help="the snapshots' CPU-minute interval")
    ap.add_argument(
        "--target", type=float, default=None, help="GenEval to reach (default: the first method's last mean)"
    )
    ap.add_argument("--out", default="benchmarks/figures/flow_rl_curves.png")
    args = ap.parse_args()
    data = OnPolicyDataModule()
    data.setup("fit")
    specs = data.val_specs
    warm = score(Path(args.warm), specs, args.samples)["overall"]

    means: dict[str, list[tuple[float, float]]] = {}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in args.methods:
        name, folders = method.split("=", 1)
        curves = [at_marks(run_curve(Path(f), specs, args.samples), args.every) for f in folders.split(",")]
        marks = sorted(set.intersection(*(set(c) for c in curves)))
        rows = [(0.0, warm, warm, warm)]
        for k in marks:
            values = [c[k] for c in curves]
            rows.append((k * args.every, sum(values) / len(values), min(values), max(values)))
        means[name] = [(m, v) for m, v, _, _ in rows]
        line = ax.plot(
            [r[0] for r in rows],
            [r[1] for r in rows],
            marker="o",
            ms=3,
            label=f"{name} ({len(curves)} seeds)",
        )
        ax.fill_between(
            [r[0] for r in rows],
            [r[2] for r in rows],
            [r[3] for r in rows],
            alpha=0.2,
            color=line[0].get_color(),
        )
        print(f"\n{name}: GenEval at CPU-minute marks (mean [min, max] over {len(curves)} seeds)")
        print("| CPU min | " + " | ".join(f"{m:g}" for m, *_ in rows) + " |")
        print("|---" * (len(rows) + 1) + "|")
        print("| GenEval | " + " | ".join(f"{v:.3f} [{lo:.3f}, {hi:.3f}]" for _, v, lo, hi in rows) + " |")

    target = args.target if args.target is not None else next(iter(means.values()))[-1][1]
    print(f"\nCPU minutes to reach GenEval {target:.3f} (mean curve, linear between marks):")
    for name, points in means.items():
        reach = minutes_to_reach(points, target)
        print(
            f"- {name}: "
            + (f"{reach:.1f}" if reach is not None else f"not reached (last {points[-1][1]:.3f})")
        )
    ax.axhline(target, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("CPU minutes (process user + system)")
    ax.set_ylabel(f"held-out GenEval ({args.samples} images / prompt)")
    ax.set_title("Flow RL on the built-in flow model")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
