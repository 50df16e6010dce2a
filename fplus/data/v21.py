"""Read LeRobot v2.1 datasets: convert them once, on open, into a LeRobot v3.0 copy that the v3.0 reader opens.

    root = v30_root(root, repo_id)     # v3.0: root itself; v2.1: the (made or reused) v3.0 copy; else a DataError

v2.1 keeps one parquet file and one MP4 per camera per episode (`data/chunk-000/episode_000000.parquet`,
`videos/chunk-000/<key>/episode_000000.mp4`) and its metadata in JSON lines (`meta/episodes.jsonl`,
`meta/tasks.jsonl`, `meta/episodes_stats.jsonl`). The copy holds the same values in the v3.0 layout:
- data: the episodes' Arrow tables appended unchanged (same schema, same bits) to v3.0 data files;
- video: the episodes' compressed packets copied unchanged into concatenated v3.0 files (re-muxed with PyAV, never
  re-encoded, so every decoded frame is bit-identical); episode k starts at the tick where episode k-1 ends, which
  is its `from_timestamp`. An episode starts a new file when its stream parameters differ from the file's, or when
  it does not start on a keyframe (so no episode ever decodes against another one's frames);
- meta/stats.json: min, max, mean, std and count aggregated exactly from the per-episode statistics (count-weighted
  mean, pooled variance), as lerobot aggregates them; quantiles cannot be aggregated, so q01..q99 are computed from
  every frame's values for the tabular features, and left out for cameras (it would take decoding every frame).

Where the copy goes: `<dataset>.fplus-v3.0` next to a local dataset; `<repo cache dir>/fplus-v3.0/<commit>` for a
hub dataset (outside the snapshot, which the hub cache owns). It is written into a temporary directory next to it
and renamed into place only when complete, with a stamp (`fplus_v21_source.json`: the source's fingerprint, its
path, the converter version) written last; a later open reuses the copy only when the stamp matches the source as
it is now. A lock file serialises conversions of one source (ranks of one job wait for the first).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import sys
import tempfile
import time
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np

from fplus.data import format as fmt
from fplus.data.stats import QUANTILES, STAT_NAMES, to_jsonable
from fplus.errors import DataError

VERSION = "v2.1"
SUFFIX = ".fplus-v3.0"
STAMP = "fplus_v21_source.json"
CONVERTER = 1  # bump when the conversion changes: copies made by an older converter are made again
META = ("meta/info.json", "meta/episodes.jsonl", "meta/tasks.jsonl", "meta/episodes_stats.jsonl")
INDEX_COLUMNS = ("index", "episode_index", "frame_index", "timestamp", "task_index")
RESTORE = "restore it from the dataset's source (download or export the dataset again)"
CONVERT_FIRST = ("convert it with the lerobot library first: to v2.1 with lerobot 0.3.x "
                 "(python -m lerobot.datasets.v2.convert_dataset_v1_to_v2 for v1.x, then "
                 "python -m lerobot.datasets.v21.convert_dataset_v20_to_v21 for v2.0), or to v3.0 with lerobot 0.4.x "
                 "(python -m lerobot.datasets.v30.convert_dataset_v21_to_v30)")


def v30_root(root: Path, repo_id: str | None = None) -> Path:
    """The v3.0 directory to read for the dataset at `root`: root itself for v3.0 (and for a directory without
    meta/info.json, which the reader reports), the converted copy for v2.1, a DataError for any other version."""
    info_path = root / fmt.INFO_PATH
    if not info_path.is_file():
        return root
    info = fmt.read_json(info_path, RESTORE)
    version = info.get("codebase_version", "missing")  # a missing version is reported like an unknown one
    if version == fmt.CODEBASE_VERSION:
        return root
    if version != VERSION:
        raise DataError(f"{info_path}: codebase_version {version!r}; fplus reads LeRobot {fmt.CODEBASE_VERSION} "
                        f"and converts {VERSION} on open: {CONVERT_FIRST}")
    missing = [name for name in META[1:] if not (root / name).is_file()]
    if missing:
        raise DataError(f"{root}: codebase_version {VERSION!r} but {root / missing[0]} is missing; {RESTORE}")
    return ensure_converted(root, info, converted_path(root, repo_id))


def converted_path(root: Path, repo_id: str | None = None) -> Path:
    """Where the v3.0 copy of a v2.1 dataset lives (see the module docstring)."""
    root = root.resolve()
    if repo_id is not None and root.parent.name == "snapshots":
        return root.parent.parent / "fplus-v3.0" / root.name
    return root.with_name(root.name + SUFFIX)


def source_fingerprint(root: Path) -> str:
    """A hash of the metadata files' bytes and of every data/video file's path, size and modification time."""
    h = hashlib.sha256()
    for name in META:
        path = root / name
        h.update(name.encode() + (path.read_bytes() if path.is_file() else b"<missing>"))
    for top in ("data", "videos"):
        for p in sorted((root / top).rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def is_current(target: Path, fingerprint: str) -> bool:
    """Whether `target` is a complete copy, made by this converter, of the source as it is now."""
    stamp = target / STAMP
    if not stamp.is_file() or not (target / fmt.INFO_PATH).is_file():
        return False
    try:
        made = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(made, dict) and made.get("fingerprint") == fingerprint and made.get("converter") == CONVERTER


def ensure_converted(root: Path, info: dict, target: Path) -> Path:
    """Reuse `target` if it is current, else convert `root` into it (printing one line to stderr). Returns target."""
    fingerprint = source_fingerprint(root)
    if is_current(target, fingerprint):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = open(target.with_name(target.name + ".lock"), "a+")  # noqa: SIM115 -- closed by the `with` below
    except OSError as err:
        raise DataError(f"{root} is a LeRobot {VERSION} dataset, which fplus converts to {fmt.CODEBASE_VERSION} "
                        f"into {target}, but that cannot be written ({err.strerror}); copy the dataset into a "
                        "writable directory, or convert it to v3.0 with lerobot 0.4.x "
                        "(python -m lerobot.datasets.v30.convert_dataset_v21_to_v30)") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # blocks while another process converts; the OS drops it if that one dies
        if is_current(target, fingerprint):  # another process converted it while this one waited
            return target
        for pattern in (".partial-*", ".old-*"):  # left by a killed conversion
            for stale in target.parent.glob(target.name + pattern):
                shutil.rmtree(stale, ignore_errors=True)
        why = " (the copy there is out of date or incomplete)" if target.exists() else ""
        print(f"{root}: LeRobot {VERSION} dataset, converting it once to {fmt.CODEBASE_VERSION} into {target}{why}; "
              "later opens reuse that copy", file=sys.stderr, flush=True)
        _convert(root, info, target, fingerprint)
    return target


def _convert(root: Path, info: dict, target: Path, fingerprint: str) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".partial-", dir=target.parent))
    state = {"writing": tmp}
    start = time.perf_counter()
    try:
        _write_v30(root, info, tmp, state)
        state["writing"] = tmp / STAMP
        (tmp / STAMP).write_text(json.dumps({"source": str(root), "fingerprint": fingerprint,
                                             "converter": CONVERTER, "seconds": round(time.perf_counter() - start, 3)},
                                            indent=1))
        if target.exists():
            old = target.with_name(target.name + f".old-{tmp.name.rsplit('-', 1)[1]}")
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, Exception) and fmt.is_disk_full(err):
            raise DataError(f"disk full while converting {root} to {fmt.CODEBASE_VERSION} (writing "
                            f"{state['writing']}; {fmt.free_space(target.parent)}); the partial copy was removed: free "
                            "space and open the dataset again") from None
        raise


def _read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict]:
    """The objects of a JSON-lines file, each checked for `required` keys; errors name the file and line."""
    if not path.is_file():
        raise DataError(f"{path.parent.parent}: codebase_version {VERSION!r} but {path} is missing; {RESTORE}")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {n} is not valid JSON ({err.msg}); {RESTORE}") from None
        missing = [k for k in required if not isinstance(row, dict) or k not in row]
        if missing:
            raise DataError(f"{path}: line {n} has no {missing[0]!r}; {RESTORE}")
        rows.append(row)
    return rows


def _write_v30(root: Path, info: dict, out: Path, state: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    info_path = root / fmt.INFO_PATH
    for required in ("fps", "features", "data_path", "chunks_size"):
        if required not in info:
            raise DataError(f"{info_path}: required field {required!r} is missing; {RESTORE}")
    meta = root / "meta"
    episodes = sorted(_read_jsonl(meta / "episodes.jsonl", ("episode_index", "tasks", "length")),
                      key=lambda r: r["episode_index"])
    tasks = {int(r["task_index"]): r["task"] for r in _read_jsonl(meta / "tasks.jsonl", ("task_index", "task"))}
    empty = [i for i, t in tasks.items() if not isinstance(t, str) or not t.strip()]
    if empty:
        raise DataError(f"{meta / 'tasks.jsonl'}: task_index {empty} has an empty instruction; fix the dataset (an "
                        "empty instruction would silently train a task-blind policy)")
    ep_stats = {int(r["episode_index"]): r["stats"]
                for r in _read_jsonl(meta / "episodes_stats.jsonl", ("episode_index", "stats"))}
    if not episodes:
        raise DataError(f"{meta / 'episodes.jsonl'} lists no episodes; {RESTORE}")
    features = info["features"]
    video_keys = [k for k, f in features.items() if f.get("dtype") == "video"]
    if video_keys and not info.get("video_path"):
        raise DataError(f"{info_path}: video features {video_keys} but no video_path; {RESTORE}")
    numeric = [k for k, f in features.items() if f.get("dtype") not in ("video", "image", "string")]
    chunk_of = lambda ep: ep // int(info["chunks_size"])  # noqa: E731

    rows, columns, total = [], {k: [] for k in numeric}, 0
    writer, schema, data_file, data_bytes = None, None, (0, 0), 0
    remuxers = {key: _Remuxer(out, key, state) for key in video_keys}
    try:
        for ep in episodes:
            e, length = int(ep["episode_index"]), int(ep["length"])
            src = root / info["data_path"].format(episode_chunk=chunk_of(e), episode_index=e)
            table = _read_episode_table(src, e, length, total)
            full = data_bytes > fmt.DATA_FILES_SIZE_IN_MB * 2**20
            if writer is not None and (full or not table.schema.equals(schema)):
                writer.close()
                writer, data_file, data_bytes = None, fmt.next_file(*data_file), 0
            if writer is None:
                path = state["writing"] = out / fmt.DATA_PATH.format(chunk_index=data_file[0], file_index=data_file[1])
                path.parent.mkdir(parents=True, exist_ok=True)
                schema = table.schema
                writer = pq.ParquetWriter(str(path), schema, compression="snappy")
            writer.write_table(table)  # one row group per episode, values as read
            data_bytes += src.stat().st_size
            for key in numeric:
                if key in table.column_names:
                    columns[key].append(_numeric(table.column(key)))
            row = {"episode_index": e, "tasks": list(ep["tasks"]), "length": length,
                   "data/chunk_index": data_file[0], "data/file_index": data_file[1],
                   "dataset_from_index": total, "dataset_to_index": total + length}
            for key, remuxer in remuxers.items():
                src = root / info["video_path"].format(episode_chunk=chunk_of(e), video_key=key, episode_index=e)
                remuxer.add(src, f"camera {key}, episode {e}", row)
            if e not in ep_stats:
                raise DataError(f"{meta / 'episodes_stats.jsonl'} has no statistics of episode {e}; {RESTORE}")
            for key, s in ep_stats[e].items():
                row.update({f"stats/{key}/{name}": v for name, v in s.items()})
            row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
            rows.append(row)
            total += length
    except BaseException:
        for remuxer in remuxers.values():  # the partial copy is deleted next: no checks, no error masking this one
            remuxer.abort()
        raise
    finally:
        if writer is not None:
            writer.close()
    for remuxer in remuxers.values():
        remuxer.close()

    path = state["writing"] = out / fmt.TASKS_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"task_index": pa.array(list(tasks), pa.int64()),
                      "__index_level_0__": pa.array(list(tasks.values()), pa.string())})
    pq.write_table(table.replace_schema_metadata({b"pandas": fmt.tasks_pandas_metadata(pa.__version__)}), path)
    path = state["writing"] = out / fmt.EPISODES_PATH.format(chunk_index=0, file_index=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        episodes_table = pa.Table.from_pylist(rows)
    except (pa.ArrowException, TypeError, ValueError) as err:
        raise DataError(f"{meta / 'episodes_stats.jsonl'}: the statistics of the episodes differ in kind or shape "
                        f"({err}); {RESTORE}") from None
    pq.write_table(episodes_table, path)
    stats = aggregate_stats([ep_stats[int(ep["episode_index"])] for ep in episodes], meta / "episodes_stats.jsonl")
    for key, parts in columns.items():
        if parts and key in stats:
            values = np.concatenate(parts).astype(np.float64)
            for q, name in zip(QUANTILES, STAT_NAMES[5:], strict=True):
                stats[key][name] = np.quantile(values, q, axis=0)
    state["writing"] = out / fmt.STATS_PATH
    (out / fmt.STATS_PATH).write_text(json.dumps(to_jsonable(stats), indent=4))
    v30 = {k: v for k, v in info.items() if k not in ("total_chunks", "total_videos", "data_path", "video_path")}
    v30.update(codebase_version=fmt.CODEBASE_VERSION, total_frames=total, total_episodes=len(episodes),
               total_tasks=len(tasks), data_files_size_in_mb=fmt.DATA_FILES_SIZE_IN_MB,
               video_files_size_in_mb=fmt.VIDEO_FILES_SIZE_IN_MB, data_path=fmt.DATA_PATH,
               video_path=fmt.VIDEO_PATH if video_keys else None)
    state["writing"] = out / fmt.INFO_PATH
    (out / fmt.INFO_PATH).write_text(json.dumps(v30, indent=4))  # last but the stamp


def _numeric(col) -> np.ndarray:
    """A numeric column (scalars or fixed/variable lists) as (N,) or (N, D), values as stored."""
    import pyarrow as pa

    col = col.combine_chunks()
    if pa.types.is_fixed_size_list(col.type) or pa.types.is_list(col.type):
        return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1)
    return col.to_numpy(zero_copy_only=False)


def _read_episode_table(path: Path, episode: int, length: int, start: int):
    """One episode's data table, checked: index columns present, `length` rows, its episode_index, and global
    indices start..start+length-1 in order (the v3.0 reader needs 0..N-1 over all episodes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError(f"data file missing: {path}; {RESTORE}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: cannot be read as parquet ({str(err).splitlines()[0]}); {RESTORE}") from None
    missing = [c for c in INDEX_COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: column {missing[0]!r} is missing; {RESTORE}")
    if table.num_rows != length:
        raise DataError(f"{path}: {table.num_rows} rows but meta/episodes.jsonl says episode {episode} has {length}; "
                        f"{RESTORE}")
    if not (_numeric(table.column("episode_index")) == episode).all():
        raise DataError(f"{path}: rows of another episode than {episode}; {RESTORE}")
    if not np.array_equal(_numeric(table.column("index")), np.arange(start, start + length)):
        raise DataError(f"{path}: the `index` column of episode {episode} is not {start}..{start + length - 1} (the "
                        f"episodes before it hold {start} frames); {RESTORE}")
    return table


def aggregate_stats(per_episode: list[dict], where: Path) -> dict[str, dict[str, np.ndarray]]:
    """Dataset statistics from per-episode ones ({key: {min, max, mean, std, count}}), exactly: min of the mins,
    max of the maxes, count-weighted mean, pooled variance sum(n_i (std_i^2 + (mean_i - mean)^2)) / N."""
    keys = list(per_episode[0])
    out = {}
    for key in keys:
        try:
            parts = [ep[key] for ep in per_episode]
            arrays = {n: np.stack([np.asarray(p[n], dtype=np.float64) for p in parts])
                      for n in ("min", "max", "mean", "std")}
            counts = np.asarray([np.asarray(p["count"]).reshape(-1)[0] for p in parts], dtype=np.int64)
        except (KeyError, ValueError, TypeError) as err:
            raise DataError(f"{where}: the statistics of {key!r} are missing or of different shapes in some episode "
                            f"({type(err).__name__}: {err}); {RESTORE}") from None
        total = counts.sum()
        n = counts.reshape(-1, *[1] * (arrays["mean"].ndim - 1)).astype(np.float64)
        mean = (arrays["mean"] * n).sum(axis=0) / total
        var = ((arrays["std"] ** 2 + (arrays["mean"] - mean) ** 2) * n).sum(axis=0) / total
        out[key] = {"min": arrays["min"].min(axis=0), "max": arrays["max"].max(axis=0), "mean": mean,
                    "std": np.sqrt(var), "count": np.array([total], dtype=np.int64)}
    return out


class _Remuxer:
    """Concatenate one camera's per-episode MP4s into v3.0 files by copying their packets (no decoding)."""

    def __init__(self, out: Path, key: str, state: dict):
        self.out, self.key, self.state = out, key, state
        self.file = (0, -1)
        self.container = self.stream = self.signature = None

    def add(self, src: Path, where: str, row: dict) -> None:
        """Append the packets of `src`; set the episode's videos/<key>/... columns in `row` (its episodes row)."""
        import av

        prefix = f"videos/{self.key}/"
        if not src.is_file():
            raise DataError(f"video file missing: {src} ({where}); {RESTORE}")
        try:
            container = av.open(str(src))
            stream = container.streams.video[0]
            packets = [p for p in container.demux(stream) if p.dts is not None]
        except (av.error.FFmpegError, IndexError) as err:
            raise DataError(f"{src} ({where}): not a readable video ({str(err).splitlines()[0]}); {RESTORE}") from None
        with container:
            if not packets:
                raise DataError(f"{src} ({where}): holds no video packets; {RESTORE}")
            cc = stream.codec_context
            signature = (cc.name, cc.width, cc.height, cc.format.name if cc.format else None,
                         bytes(cc.extradata or b""), stream.time_base)
            if self.container is None or signature != self.signature or not packets[0].is_keyframe or \
                    self.bytes > fmt.VIDEO_FILES_SIZE_IN_MB * 2**20:
                self._start(stream, signature)
            tb = stream.time_base
            lowest_dts = min(p.dts for p in packets)
            # Episode k starts where episode k-1 ends (or later, if B-frames would make the dts go back).
            offset = max(self.end, self.last_dts + 1 - lowest_dts) if self.last_dts is not None else 0
            end = offset + max(p.pts + (p.duration or 0) for p in packets)
            for p in packets:
                p.pts, p.dts = p.pts + offset, p.dts + offset
                self.written.append((p.pts, zlib.crc32(bytes(p))))
                self.bytes += p.size
                self.last_dts = p.dts
                p.stream = self.stream
                self.container.mux(p)
            self.end = end
        row.update({prefix + "chunk_index": self.file[0], prefix + "file_index": self.file[1],
                    prefix + "from_timestamp": Fraction(offset) * tb, prefix + "to_timestamp": Fraction(end) * tb})
        self.rows.append(row)  # the times are final when the file is closed (see close)

    def _start(self, template, signature) -> None:
        import av

        self.close()
        self.file = fmt.next_file(*self.file) if self.file[1] >= 0 else (0, 0)
        self.path = self.out / fmt.VIDEO_PATH.format(video_key=self.key, chunk_index=self.file[0],
                                                     file_index=self.file[1])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.state["writing"] = self.path
        self.container = av.open(str(self.path), mode="w")
        self.stream = self.container.add_stream_from_template(template=template, opaque=True)
        self.stream.time_base = template.time_base
        self.signature, self.time_base = signature, template.time_base
        self.end, self.last_dts, self.bytes, self.written, self.rows = 0, None, 0, [], []

    def abort(self) -> None:
        container, self.container = self.container, None
        if container is not None:
            try:
                container.close()
            except Exception:  # noqa: BLE001,S110 -- the partial file is deleted with the partial copy
                pass

    def close(self) -> None:
        """Finish the current file, then check that it holds exactly the packets written, at their times up to one
        shift for the whole file (which the muxer may apply); the episodes' timestamps get that shift, as floats."""
        import av

        if self.container is None:
            return
        container, self.container = self.container, None
        container.close()
        with av.open(str(self.path)) as check:
            stream = check.streams.video[0]
            got = [(Fraction(p.pts) * stream.time_base, zlib.crc32(bytes(p))) for p in check.demux(stream)
                   if p.dts is not None]
        want = [(Fraction(pts) * self.time_base, crc) for pts, crc in self.written]
        shift = got[0][0] - want[0][0] if got and want else Fraction(0)
        if [(t + shift, crc) for t, crc in want] != got:
            raise DataError(f"{self.path}: re-muxing changed the packets or their times ({len(got)} packets read "
                            f"back, {len(want)} written); this is a bug in fplus: report it with the source dataset")
        for row in self.rows:
            for name in ("from_timestamp", "to_timestamp"):
                row[f"videos/{self.key}/{name}"] = float(row[f"videos/{self.key}/{name}"] + shift)
