"""Does the world memory work on the demo? The demo matrix over several seeds, with the targets of the
"Valid experiments" issue checked against trivial baselines.

    python benchmarks/demo_memory.py                       # seeds 0,1,2; E0, E1, E2, E4; ~12 min a seed on 2 cores
    python benchmarks/demo_memory.py --seeds 0 --experiments E0,E2

Each seed is `fplus matrix --profile demo` with SEED=<seed> and OUTPUT_DIR=<root>/seed-<seed> (resumable: a
finished seed is only collected again). The demo data, latents and CoC labels are shared. Prints one table per
question and writes benchmarks/results/demo_memory-<device>.json:

- offline (validation episodes, normalised action MSE): E2 under every corruption mode against E0, E1 and E4
  against E0; the targets E2 none <= 0.95 x E0 none, zero and shuffle >= 1.2 x none, oracle <= none;
- the world cosine of the Prophet beside the training-mean and copy-last baselines (standardised space);
- closed loop (Meta-World): success per mode with the 95% Wilson interval and its width.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_results  # noqa: E402

MODES = ("none", "zero", "random", "shuffle", "oracle", "history")


def run_seed(seed: int, root: Path, experiments: list[str]) -> Path:
    out = root / f"seed-{seed}"
    env = {**os.environ, "SEED": str(seed), "OUTPUT_DIR": str(out), "MATRIX_EXPERIMENTS": ",".join(experiments),
           "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    fplus = str(Path(sys.executable).with_name("fplus"))
    subprocess.run([fplus, "matrix", "--profile", "demo"], env=env, check=True)
    return out


def newest(directory: Path, prefix: str) -> dict | None:
    files = sorted(directory.glob(f"{prefix}*.json"))
    return json.loads(files[-1].read_text()) if files else None


def collect(run: Path) -> dict:
    offline = newest(run / "eval", "offline-step-")
    sim = newest(run / "eval", "sim-metaworld-step-")
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
           if json.loads(line)["kind"] == "val"]
    return {"mse": {m: r["mse_norm"] for m, r in offline["modes"].items()}, "gate": offline["gate"],
            "world": offline.get("world"), "val_points": len(val),
            "val_curve": [{"step": v["step"], "gate": v.get("gate"),
                           **{m: v.get(f"val_mse_{m}") for m in MODES if f"val_mse_{m}" in v}} for v in val],
            "sim": None if sim is None else sim["overall"]}


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--experiments", default="E0,E1,E2,E4")
    parser.add_argument("--root", type=Path, default=Path("outputs/demo-seeds"))
    parser.add_argument("--collect-only", action="store_true", help="do not run the matrix, only read the runs")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    experiments = args.experiments.split(",")
    runs: dict[int, dict[str, dict]] = {}
    for seed in seeds:
        out = args.root / f"seed-{seed}" if args.collect_only else run_seed(seed, args.root, experiments)
        runs[seed] = {e: collect(out / e) for e in experiments if (out / e / "COMPLETE").is_file()}

    rows, checks = [], []
    for seed, per in runs.items():
        e0 = per["E0"]["mse"]["none"]
        row = {"seed": seed, "E0 none": e0}
        for e in experiments[1:]:
            if e in per:
                row[f"{e}/E0"] = per[e]["mse"]["none"] / e0
        if "E2" in per:
            e2 = per["E2"]["mse"]
            row.update({f"E2 {m}/none": e2[m] / e2["none"] for m in MODES[1:] if m in e2})
            row["E2 gate"] = per["E2"]["gate"]
            row["val points"] = per["E2"]["val_points"]
            checks.append({"seed": seed, "E2 none <= 0.95 x E0": e2["none"] <= 0.95 * e0,
                           "zero >= 1.2 x none": e2["zero"] >= 1.2 * e2["none"],
                           "shuffle >= 1.2 x none": e2["shuffle"] >= 1.2 * e2["none"],
                           "oracle <= none": e2["oracle"] <= e2["none"]})
        rows.append(row)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    print("\noffline validation, normalised action MSE (ratios)")
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns)
              + " |")
    print("\ntargets: " + "; ".join(f"seed {c['seed']}: " + ", ".join(f"{k} {'yes' if v else 'NO'}"
                                                                        for k, v in c.items() if k != "seed")
                                    for c in checks))

    print("\nworld cosine (standardised; raw in brackets): Prophet vs training mean vs copy-last")
    for seed, per in runs.items():
        for e, r in per.items():
            w = r["world"]
            if w:
                print(f"  seed {seed} {e}: Prophet {w['prophet']:.3f} [{w['prophet_raw']:.5f}]  mean "
                      f"{w['mean']:.3f} [{w['mean_raw']:.5f}]  copy-last {w['copy']:.3f} [{w['copy_raw']:.5f}]")

    print("\nclosed loop (Meta-World, all tasks): success [95% interval] (episodes)")
    pooled: dict[tuple[str, str], list[int]] = {}
    for seed, per in runs.items():
        for e, r in per.items():
            for mode, cell in (r["sim"] or {}).items():
                lo, hi = cell["ci95"]
                print(f"  seed {seed} {e} {mode}: {cell['rate']:.0%} [{lo:.0%}, {hi:.0%}] width {hi - lo:.0%} "
                      f"({cell['successes']}/{cell['episodes']})")
                acc = pooled.setdefault((e, mode), [0, 0])
                acc[0] += cell["successes"]
                acc[1] += cell["episodes"]
    print("  pooled over seeds:")
    for (e, mode), (wins, n) in pooled.items():
        lo, hi = wilson(wins, n)
        print(f"    {e} {mode}: {wins / n:.0%} [{lo:.0%}, {hi:.0%}] ({wins}/{n})")
    path = write_results("demo_memory", rows, {"checks": checks, "runs": {str(s): r for s, r in runs.items()},
                                               "pooled_closed_loop": {f"{e} {m}": v for (e, m), v in pooled.items()}})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
