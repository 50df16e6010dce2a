"""Shared bits of the benchmark scripts: environment description, Markdown table, JSON output."""

from __future__ import annotations

import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    """Device name and library versions, recorded with every result."""
    import torch
    import transformers

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"device": device, "cuda": torch.cuda.is_available(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(), "date": datetime.now(UTC).isoformat(timespec="seconds")}


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    return f"{value:,.1f}" if isinstance(value, float) else str(value)


def write_results(name: str, rows: list[dict], extra: dict | None = None) -> Path:
    """Write benchmarks/results/<name>-<device>.json and return its path."""
    env = environment()
    RESULTS.mkdir(parents=True, exist_ok=True)
    slug = "gpu" if env["cuda"] else "cpu"
    path = RESULTS / f"{name}-{slug}.json"
    path.write_text(json.dumps({"benchmark": name, "environment": env, "rows": rows, **(extra or {})}, indent=2))
    return path


def timed(fn, repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of `repeats` calls after `warmup` calls (CUDA synchronised)."""
    import torch

    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out
