"""LOGGER=wandb: what a training run and a closed-loop evaluation log, read back from W&B's offline run files."""

import json
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fplus.errors import ConfigError
from fplus.rundir import METRICS, run_dir_for, settings_from_run
from fplus.train.loggers import WANDB_FILE, closed_loop_logger, log_closed_loop
from fplus.train.recipe import TrainRecipe
from fplus.train.run import train_run
from tests.helpers import toy_settings

wandb = pytest.importorskip("wandb")

# W&B's .wandb file: a 7-byte header (":W&B", magic 0xBEE1, version), then 32 KiB blocks of chunks (crc32c, length,
# type: 1 full, 2 first, 3 middle, 4 last); a block's tail under 7 bytes is padding. Each record is a protobuf Record.
BLOCK, CHUNK = 32768, struct.Struct("<IHB")


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1
    out, pos, pending = [], 7, b""
    while pos + CHUNK.size <= len(data):
        if BLOCK - pos % BLOCK < CHUNK.size:
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = CHUNK.unpack_from(data, pos)
        pending += data[pos + CHUNK.size:pos + CHUNK.size + length]
        pos += CHUNK.size + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def offline_runs(wandb_dir: Path) -> list[dict]:
    """Every offline run (one per `wandb.init`) under WANDB_DIR in start order: {"dir", "id", "name", "tags",
    "project", "config", "history": [{key: value}]}."""
    wandb.teardown()  # `finish()` may return before W&B's service has written the file out; this waits for it
    runs = []
    for run_dir in sorted((wandb_dir / "wandb").glob("offline-run-*")):
        (path,) = run_dir.glob("run-*.wandb")
        run = {"dir": run_dir, "history": [], "config": {}}
        for r in records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run.update(id=r.run.run_id, name=r.run.display_name, tags=list(r.run.tags), project=r.run.project,
                           start=r.run.start_time.ToNanoseconds())
                run["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
            elif kind == "config":
                run["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
            elif kind == "history":  # a media value is one item per field: nested_key = (key, field)
                row: dict = {}
                for i in r.history.item:
                    key, *fields = [i.key] if i.key else list(i.nested_key)
                    if fields:
                        row.setdefault(key, {})[fields[0]] = json.loads(i.value_json)
                    else:
                        row[key] = json.loads(i.value_json)
                run["history"].append(row)
        runs.append(run)
    return sorted(runs, key=lambda run: run["start"])


@pytest.fixture
def wandb_dir(tmp_path, monkeypatch):
    path = tmp_path / "wandb-files"
    path.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    wandb.teardown()  # W&B reads its environment once per process (its singleton): start afresh with this one
    yield path
    wandb.teardown()


def jsonl(run_dir: Path, kind: str) -> dict[int, dict]:
    lines = [json.loads(x) for x in (run_dir / METRICS).read_text().splitlines()]
    return {x["step"]: x for x in lines if x["kind"] == kind}


def write_mp4(path: Path, value: int) -> Path:
    from fplus.data.video import VideoEncoder

    encoder = VideoEncoder(path, fps=10, height=16, width=16)
    encoder.write(np.full((4, 16, 16, 3), value, np.uint8))
    encoder.close()
    return path


def test_training_logs_metrics_and_resume_continues_the_same_run(toy, tmp_path, wandb_dir):
    s = toy_settings(toy, toy / "ds", OUTPUT_DIR=tmp_path / "runs", EXPERIMENT="E2", MAX_STEPS=4, SAVE_EVERY=2,
                     VAL_EVERY=2, VAL_BATCHES=1, BATCH_SIZE=2, LOGGER="wandb", WANDB_TAGS="toy, e2-test",
                     WANDB_PROJECT="fplus-test")
    run_dir = run_dir_for(s)
    train_run(s, run_dir, stop_after=3, progress_bar=False)  # "killed" after step 3; checkpoint of step 2
    stored = json.loads((run_dir / WANDB_FILE).read_text())
    assert stored == {"id": stored["id"], "project": "fplus-test", "entity": None} and len(stored["id"]) == 8
    train_run(s, run_dir, resume=True, progress_bar=False)
    assert json.loads((run_dir / WANDB_FILE).read_text()) == stored

    first, resumed = offline_runs(wandb_dir)
    assert first["id"] == resumed["id"] == stored["id"]
    assert first["name"] == resumed["name"] == "E2" and first["project"] == "fplus-test"
    assert first["tags"] == ["toy", "e2-test", "E2"]
    assert first["config"]["EXPERIMENT"] == "E2" and first["config"]["LOGGER"] == "wandb"

    def by_step(run: dict, prefix: str) -> dict[int, dict]:
        rows: dict[int, dict] = {}
        for row in run["history"]:
            values = {k[len(prefix):]: v for k, v in row.items() if k.startswith(prefix)}
            if values:
                rows.setdefault(row["_step"], {}).update(values)
        return rows

    train, val = jsonl(run_dir, "train"), jsonl(run_dir, "val")
    assert sorted(by_step(first, "train/")) == [1, 2, 3] and sorted(by_step(resumed, "train/")) == [3, 4]
    logged = {**by_step(first, "train/"), **by_step(resumed, "train/")}
    for step in (1, 2, 3, 4):
        line = train[step]
        assert logged[step]["loss"] == line["loss"] and logged[step]["gate"] == line["gate"]
        assert logged[step]["lr_heads"] == line["lr_heads"] and logged[step]["l_world"] == line["l_world"]
        assert "step" not in logged[step] and "epoch" not in logged[step]
    # exact resume: step 3 of the killed attempt and of the resumed one log the same numbers
    assert by_step(first, "train/")[3]["loss"] == by_step(resumed, "train/")[3]["loss"]
    vals = {**by_step(first, "val/"), **by_step(resumed, "val/")}
    assert sorted(vals) == sorted(val) == [2, 4]
    world = ("val_cos_world", "val_cos_world_mean", "val_cos_world_copy", "val_cos_world_raw",
             "val_cos_world_mean_raw", "val_cos_world_copy_raw")
    for step in (2, 4):
        expected = {k: v for k, v in val[step].items() if isinstance(v, float | int) and k not in ("step", "epoch")}
        assert {"gate", "val_mse_none", "val_mse_zero", *world} <= set(expected)
        assert vals[step] == expected

    # `fplus eval --sim` logs into the same W&B run (resumed by the stored id)
    video = write_mp4(tmp_path / "videos" / "reach-v3-none-ep0.mp4", 90)
    result = {"simulator": "metaworld", "step": 4, "overall": {"none": {"rate": 0.5}},
              "tasks": {"reach-v3": {"none": {"rate": 0.5}, "oracle": {"rate": None}}}}
    log_closed_loop(settings_from_run(run_dir), run_dir, result, [video])
    evaluation = offline_runs(wandb_dir)[-1]
    assert evaluation["id"] == stored["id"] and evaluation["tags"] == ["toy", "e2-test", "E2"]
    (row,) = evaluation["history"]
    assert row["closed_loop/metaworld/task/reach-v3/none"] == 0.5 and row["closed_loop/step"] == 4


def test_closed_loop_results_and_new_videos_are_logged(tmp_path, wandb_dir):
    s = toy_settings(tmp_path, tmp_path / "ds", LOGGER="wandb", EXPERIMENT="E2", WANDB_RUN_NAME="my-e2")
    run_dir = tmp_path / "runs" / "E2"
    run_dir.mkdir(parents=True)
    (run_dir / WANDB_FILE).write_text(json.dumps({"id": "abc123xy", "project": "fplus", "entity": None}))
    videos = tmp_path / "videos"
    old = write_mp4(videos / "push-v3-none-ep0.mp4", 10)  # of an earlier evaluation: not logged again
    os.utime(old, (time.time() - 60, time.time() - 60))
    log = closed_loop_logger(s, run_dir, videos)
    new = write_mp4(videos / "reach-v3-none-ep0.mp4", 200)
    zero = write_mp4(videos / "reach-v3-zero-ep0.mp4", 120)
    cell = lambda wins, n: {"successes": wins, "episodes": n, "rate": wins / n, "ci95": [0.0, 1.0]}  # noqa: E731
    result = {"run": str(run_dir), "simulator": "metaworld", "step": 120,
              "tasks": {"reach-v3": {"none": cell(3, 4), "zero": cell(1, 4),
                                     "oracle": {"successes": None, "episodes": 0, "rate": None, "ci95": None}},
                        "push-v3": {"none": cell(2, 4), "zero": cell(0, 4)}},
              "overall": {"none": cell(5, 8), "zero": cell(1, 8)},
              "latency": {"rtc": {"2": {"overall": cell(3, 8)}}, "naive": {"2": {"overall": cell(1, 8)}}}}
    log(result)

    (run,) = offline_runs(wandb_dir)
    assert run["id"] == "abc123xy" and run["name"] == "my-e2" and run["tags"] == ["E2"]
    (row,) = run["history"]
    rates = {k: v for k, v in row.items() if k.startswith("closed_loop/") and "/video/" not in k}
    assert rates == {"closed_loop/step": 120,
                     "closed_loop/metaworld/task/reach-v3/none": 0.75, "closed_loop/metaworld/task/reach-v3/zero": 0.25,
                     "closed_loop/metaworld/task/push-v3/none": 0.5, "closed_loop/metaworld/task/push-v3/zero": 0.0,
                     "closed_loop/metaworld/overall/none": 0.625, "closed_loop/metaworld/overall/zero": 0.125,
                     "closed_loop/metaworld/latency/rtc-d2": 0.375, "closed_loop/metaworld/latency/naive-d2": 0.125}
    logged = {k.rsplit("/", 1)[1]: v for k, v in row.items() if "/video/" in k}
    assert sorted(logged) == ["reach-v3-none-ep0", "reach-v3-zero-ep0"]  # the earlier push-v3 video is not
    for name, source in (("reach-v3-none-ep0", new), ("reach-v3-zero-ep0", zero)):
        assert logged[name]["_type"] == "video-file"
        assert (run["dir"] / "files" / logged[name]["path"]).read_bytes() == source.read_bytes()


def test_other_loggers_leave_the_closed_loop_alone(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not even imported
    s = toy_settings(tmp_path, tmp_path / "ds", LOGGER="none")
    assert closed_loop_logger(s, tmp_path / "run", None) is None


def test_missing_wandb_package_is_one_line_saying_what_to_install(toy, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    s = toy_settings(toy, toy / "ds", OUTPUT_DIR=tmp_path, EXPERIMENT="E0", MAX_STEPS=1, LOGGER="wandb")
    with pytest.raises(ConfigError, match=r"^LOGGER=wandb needs the wandb package \(pip install wandb") as err:
        TrainRecipe(s, run_dir_for(s)).setup()
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="LOGGER=wandb needs the wandb package"):  # before any rollout
        closed_loop_logger(s, run_dir_for(s), None)
    assert not (run_dir_for(s) / WANDB_FILE).exists()


def test_damaged_wandb_file_names_itself(tmp_path, wandb_dir):
    s = toy_settings(tmp_path, tmp_path / "ds", LOGGER="wandb")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / WANDB_FILE).write_text(json.dumps({"project": "fplus"}))
    with pytest.raises(ConfigError, match=rf"{WANDB_FILE} records no W&B run id \(`id`\); delete it"):
        log_closed_loop(s, run_dir, {"simulator": "metaworld", "step": 1, "tasks": {}, "overall": {}}, [])
    assert not (wandb_dir / "wandb").exists() or not list((wandb_dir / "wandb").glob("offline-run-*"))


def test_wandb_tags_setting():
    from fplus.settings import load_settings

    assert load_settings(None, {"WANDB_TAGS": "a, b,,c"}, environ={}, dotenv=None).train.wandb_tags == ["a", "b", "c"]
    assert load_settings(None, {"WANDB_TAGS": ""}, environ={}, dotenv=None).train.wandb_tags == []
    defaults = load_settings(None, {}, environ={}, dotenv=None).train
    assert (defaults.wandb_project, defaults.wandb_entity, defaults.wandb_run_name, defaults.wandb_tags) == \
        ("fplus", None, None, [])


def test_a_wandb_run_that_cannot_start_is_one_line(tmp_path, wandb_dir, monkeypatch):
    def refuse(**kwargs):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.\nmore detail")

    monkeypatch.setattr(wandb, "init", refuse)
    s = toy_settings(tmp_path, tmp_path / "ds", LOGGER="wandb")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / WANDB_FILE).write_text(json.dumps({"id": "abc123xy"}))
    with pytest.raises(ConfigError) as err:
        log_closed_loop(s, tmp_path / "run", {"simulator": "metaworld", "step": 1, "tasks": {}, "overall": {}}, [])
    assert str(err.value) == (f"LOGGER=wandb: cannot start the W&B run abc123xy of {tmp_path / 'run'} (No API key "
                              "configured. Use `wandb login` to log in.); log in with `wandb login`, or set "
                              "WANDB_MODE=offline and upload later with `wandb sync`")
