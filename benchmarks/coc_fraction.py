"""What COC_FRACTION costs the CoC text loss and buys in speed: E4 of the demo profile trained once per fraction,
one run after another on the same machine, each validated on the CoC text of EVERY validation sample (val_l_text)
beside its unigram baseline (val_l_text_unigram: each label token scored by its training frequency).

    python benchmarks/coc_fraction.py                      # COC_FRACTION 1 and 0.25; ~3 min a run on 2 cores
    python benchmarks/coc_fraction.py --fractions 1,0.5,0.25 --root outputs/coc_fraction

Needs the demo's data, latents and CoC labels (`make demo` makes them). Each run is `fplus train -e E4 --profile demo`
with COC_FRACTION=<f> and OUTPUT_DIR=<root> (a finished run is only collected again). Prints a table and writes
benchmarks/results/coc_fraction-<device>.json: per fraction the validation curve (val_l_text, val_mse_none,
val_mse_zero), the final numbers and the training wall time and samples/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import markdown_table, write_results  # noqa: E402

DEMO = Path("outputs/demo")
NEEDED = (DEMO / "data", DEMO / "latents", DEMO / "coc.jsonl")
WALL = "benchmark_wall_s.json"  # written into a run directory once the run finished here


def train(fraction: float, root: Path) -> Path:
    """The E4 run of COC_FRACTION=fraction under `root` (trained unless it is complete)."""
    run = root / f"f{fraction:g}"
    if (run / "COMPLETE").is_file() and (run / WALL).is_file():
        return run
    env = {**os.environ, "OUTPUT_DIR": str(root), "COC_FRACTION": str(fraction), "HF_HUB_OFFLINE": "1"}
    fplus = str(Path(sys.executable).with_name("fplus"))
    args = [fplus, "train", "-e", "E4", "--profile", "demo", "--run-name", run.name]
    if run.exists():
        args.append("--resume")
    t0 = time.perf_counter()
    subprocess.run(args, env=env, check=True)
    (run / WALL).write_text(json.dumps({"wall_s": time.perf_counter() - t0, "resumed": "--resume" in args}))
    return run


def collect(run: Path) -> dict:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in lines if r["kind"] == "val"]
    train_lines = [r for r in lines if r["kind"] == "train"]
    keys = ("val_l_text", "val_l_text_unigram", "val_mse_none", "val_mse_zero")
    curve = [{"step": r["step"], **{k: r.get(k) for k in keys}} for r in val]
    return {"run": str(run), "curve": curve, "final": curve[-1], "steps": train_lines[-1]["step"],
            "train_l_text_last": train_lines[-1].get("l_text"),
            "samples_per_s_median": statistics.median(r["samples_per_s"] for r in train_lines),
            **json.loads((run / WALL).read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fractions", default="1,0.25", help="comma-separated COC_FRACTION values")
    parser.add_argument("--root", type=Path, default=Path("outputs/coc_fraction"), help="OUTPUT_DIR of the runs")
    args = parser.parse_args()
    missing = [str(p) for p in NEEDED if not p.exists()]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: run `make demo` first (it makes the demo data, latents and labels)")
    fractions = [float(f) for f in args.fractions.split(",")]
    results = {f"{f:g}": collect(train(f, args.root)) for f in fractions}
    rows = [{"COC_FRACTION": f, "steps": r["steps"], "val_l_text": f"{r['final']['val_l_text']:.4f}",
             "unigram": f"{r['final']['val_l_text_unigram']:.4f}", "val_mse_none": f"{r['final']['val_mse_none']:.4f}",
             "val_mse_zero": f"{r['final']['val_mse_zero']:.4f}", "samples/s": r["samples_per_s_median"],
             "wall_s": r["wall_s"]} for f, r in results.items()]
    print(markdown_table(rows, list(rows[0])))
    first = results[f"{fractions[0]:g}"]["curve"]
    print("\nval_l_text over the validation points: " + "; ".join(
        f"f={f}: " + ", ".join(f"{p['step']}:{p['val_l_text']:.3f}" for p in r["curve"]) for f, r in results.items()))
    print(f"(step {first[0]['step']} of COC_FRACTION={fractions[0]:g} is the first validation point)")
    path = write_results("coc_fraction", rows, {"experiment": "E4", "profile": "demo", "runs": results,
                                               "timing": "one run after another on this machine"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
