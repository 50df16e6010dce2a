"""benchmarks/gpu_suite.sh and gpu_suite.py (issue 16, item 9): the smoke mode runs end to end on the CPU and writes a
JSON whose numbers are finite, positive and consistent with each other; the wheelhouse groups and the time budget
decide what is installed and what runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"
PARTS = {"train_lora", "inference", "train_full", "latents"}
NAMES = {"E0", "E2", "E4"}


def run_suite(tmp_path: Path, *args: str, budget: int = 450) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "GPU_SUITE_BUDGET_S": str(budget), "FPLUS_GPU_SITE": str(tmp_path / "site")}
    return subprocess.run(["bash", str(SUITE), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)


def positive(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_smoke_suite_writes_consistent_finite_results(tmp_path):
    out = tmp_path / "suite.json"
    proc = run_suite(tmp_path, "--smoke", "--peak-tflops", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["benchmark"] == "gpu_suite" and data["mode"] == "smoke"
    assert set(data["parts"]) == PARTS
    assert {p: r["status"] for p, r in data["parts"].items()} == dict.fromkeys(PARTS, "done")
    assert all(positive(r["seconds"]) for r in data["parts"].values())

    for part, finetune in (("train_lora", "lora"), ("train_full", "full")):
        r = data["parts"][part]
        assert r["finetune"] == finetune
        assert set(r["experiments"]) == (NAMES | {"E4 f=0.25"} if finetune == "lora" else NAMES)
        for rec in r["experiments"].values():
            for key in ("step_ms", "min_ms", "max_ms", "tokens", "samples_per_s", "flops_per_step", "mfu",
                        "build_s", "params", "trainable_params"):
                assert positive(rec[key]), (part, key, rec[key])
            assert rec["steps"] == len(rec["step_ms_all"]) >= 1
            assert all(positive(t) for t in rec["step_ms_all"])
            assert rec["min_ms"] <= rec["step_ms"] <= rec["max_ms"]
            assert rec["step_ms"] == pytest.approx(np.median(rec["step_ms_all"]))
            assert rec["samples_per_s"] == pytest.approx(2 / rec["step_ms"] * 1e3)  # smoke batch 2
            assert rec["mfu"] == pytest.approx(rec["flops_per_step"] / (rec["step_ms"] / 1e3) / 1e12)
            assert rec["peak_GiB"] is None  # CUDA only
            assert rec["attn_implementation"]["text"] in ("sdpa", "eager", "flash_attention_2")
            assert rec["weight_dtypes"]["trainable"] == ["float32"]
            assert (rec["weight_dtypes"]["frozen"] != []) == (finetune == "lora")
            assert (rec["trainable_params"] < rec["params"]) == (finetune == "lora")
        exps = r["experiments"]
        for key in ("E2/E0", "E4/E0", *(("E4 f=0.25/E0",) if finetune == "lora" else ())):
            name = key.split("/")[0]
            assert r["ratios"][key] == pytest.approx(exps[name]["step_ms"] / exps["E0"]["step_ms"])
            assert r["ratios_min"][key] == pytest.approx(exps[name]["min_ms"] / exps["E0"]["min_ms"])
            paired = np.median(np.array(exps[name]["step_ms_all"]) / np.array(exps["E0"]["step_ms_all"]))
            assert r["ratios_paired"][key] == pytest.approx(paired)
        assert exps["E4"]["tokens"] > exps["E0"]["tokens"]  # E4's FUT tokens and CoC text
    lora = data["parts"]["train_lora"]["experiments"]
    # smoke batch 2: COC_FRACTION=0.25 puts the demo's label on 1 sample, so half the CoC tokens per sample
    label = data["config"]["coc_tokens"]
    assert label > 20 and lora["E4"]["tokens"] - lora["E4 f=0.25"]["tokens"] == pytest.approx(label / 2, abs=2)

    inference = data["parts"]["inference"]["experiments"]
    assert set(inference) == NAMES
    for rec in inference.values():
        for timing in (rec, rec["model_only"]):
            assert all(positive(timing[k]) for k in ("p50_ms", "p95_ms", "p99_ms"))
            assert timing["p50_ms"] <= timing["p95_ms"] <= timing["p99_ms"]
            assert timing["iters"] == 5
        assert positive(rec["tokens"])

    rows = data["parts"]["latents"]["rows"]
    assert [(r["source"], r["dtype"]) for r in rows] == [("dino", "fp32"), ("vjepa", "fp32")]
    assert all(positive(r["frames_per_s"]) for r in rows)

    targets = {t["name"]: t for t in data["targets"]}
    assert data["targets_apply"] is False  # a smoke run on the CPU
    for part in ("train_lora", "train_full"):
        for key, limit in (("E2/E0", 1.05), ("E4/E0", 1.25), *((("E4 f=0.25/E0", 1.25),) if part == "train_lora"
                                                               else ())):
            t = targets[f"{part} {key}"]
            assert (t["value"], t["limit"], t["pass"]) == (data["parts"][part]["ratios"][key], limit,
                                                           data["parts"][part]["ratios"][key] <= limit)
    for name in NAMES:
        assert targets[f"inference {name} p50_ms"]["value"] == inference[name]["p50_ms"]
        assert targets[f"train_full {name} MFU"]["value"] == data["parts"]["train_full"]["experiments"][name]["mfu"]
    assert "| train_lora | E4 |" in proc.stdout


def test_wheelhouse_groups_and_budget(tmp_path):
    """A group whose distribution is present at an accepted version is kept (nothing installed); a budget that covers
    no part skips every part with its reason and still writes the JSON."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "groups.txt").write_text("# comment\npydantic>=2.10|pydantic==2.14.4\n")
    out = tmp_path / "skipped.json"
    proc = run_suite(tmp_path, str(wheels), "--smoke", "--out", str(out), budget=0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "keeping pydantic" in proc.stderr and "installing" not in proc.stderr
    data = json.loads(out.read_text())
    assert {p: r["status"] for p, r in data["parts"].items()} == dict.fromkeys(PARTS, "skipped")
    assert all("of the budget left" in r["reason"] for r in data["parts"].values())
    assert data["targets"] == []


def test_missing_group_is_installed_from_the_wheelhouse_only(tmp_path):
    """A missing distribution is asked of the wheelhouse alone (--no-index): without its wheel the install fails
    before the suite starts."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "groups.txt").write_text("fplus-no-such-dist>=1|fplus-no-such-dist==1.0\n")
    proc = run_suite(tmp_path, str(wheels), "--smoke", "--out", str(tmp_path / "x.json"))
    assert proc.returncode != 0
    assert "installing fplus-no-such-dist==1.0 (fplus-no-such-dist: missing" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_missing_wheelhouse_is_one_clear_error(tmp_path):
    proc = run_suite(tmp_path, str(tmp_path / "nowhere"), "--smoke")
    assert proc.returncode == 2
    assert "groups.txt not found" in proc.stderr and "scripts/gpu_wheelhouse.sh" in proc.stderr
