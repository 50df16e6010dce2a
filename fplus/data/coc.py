"""Chain-of-causation (CoC) labels: a JSONL file, one episode per line.

    {"episode_index": 12, "coc_text": "approach the drawer handle, because ..."}
    {"episode_id": "episode_000013", "coc_text": "..."}      (episode_id: an int or `episode_<digits>`)

`read_coc` parses leniently and reports every problem with its line number; training uses `load_coc`, which
refuses a file with problems or one that misses an episode it needs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from fplus.errors import FplusError

TEXT_KEY = "coc_text"
ID_KEYS = ("episode_index", "episode_id")


@dataclass(frozen=True)
class CocProblem:
    """One problem of a CoC file: its line (1-based, 0 for the whole file), kind and message."""

    line: int
    kind: str
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" if self.line else self.message


@dataclass
class CocFile:
    """Parsed labels {episode_index: text} (first occurrence wins) and the problems found."""

    path: Path
    texts: dict[int, str] = field(default_factory=dict)
    lines: dict[int, int] = field(default_factory=dict)  # episode_index -> line it came from
    problems: list[CocProblem] = field(default_factory=list)


def _episode_index(record: dict) -> int | None:
    if "episode_index" in record:
        value = record["episode_index"]
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
    value = record["episode_id"]
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = re.fullmatch(r"(?:episode_)?(\d+)", str(value))
    return int(match.group(1)) if match else None


def read_coc(path: Path) -> CocFile:
    """Parse a CoC JSONL file; schema problems, duplicates and empty texts become line-numbered problems."""
    path = Path(path)
    if not path.is_file():
        raise FplusError(f"CoC file {path} not found")
    out = CocFile(path)
    with path.open(encoding="utf-8") as f:
        for n, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as err:
                out.problems.append(CocProblem(n, "json", f"not valid JSON ({err.msg})"))
                continue
            if not isinstance(record, dict):
                out.problems.append(CocProblem(n, "schema", "a line must be a JSON object"))
                continue
            ids = [k for k in ID_KEYS if k in record]
            if len(ids) != 1:
                out.problems.append(CocProblem(n, "schema", "needs exactly one of episode_index, episode_id"))
                continue
            unknown = sorted(set(record) - {*ID_KEYS, TEXT_KEY})
            if unknown:
                out.problems.append(CocProblem(n, "schema", f"unknown field(s) {unknown}"))
            episode = _episode_index(record)
            if episode is None:
                out.problems.append(CocProblem(n, "schema", f"{ids[0]}={record[ids[0]]!r} is not an episode index"))
                continue
            text = record.get(TEXT_KEY)
            if not isinstance(text, str):
                out.problems.append(CocProblem(n, "schema", f"missing or non-string {TEXT_KEY}"))
                continue
            if not text.strip():
                out.problems.append(CocProblem(n, "empty", f"episode {episode}: empty {TEXT_KEY}"))
                continue
            if episode in out.texts:
                out.problems.append(CocProblem(
                    n, "duplicate", f"episode {episode} already labelled on line {out.lines[episode]}"))
                continue
            out.texts[episode] = text.strip()
            out.lines[episode] = n
    return out


def load_coc(path: Path, needed_episodes: list[int]) -> dict[int, str]:
    """The CoC text of every needed episode; any problem in the file or a missing episode is an error."""
    coc = read_coc(path)
    if coc.problems:
        shown = "; ".join(str(p) for p in coc.problems[:5])
        more = f" (+{len(coc.problems) - 5} more)" if len(coc.problems) > 5 else ""
        raise FplusError(f"{path}: {shown}{more}. Run `fplus coc validate {path}` for the full report")
    missing = sorted(set(needed_episodes) - set(coc.texts))
    if missing:
        raise FplusError(f"{path} has no CoC text for {len(missing)} of {len(needed_episodes)} training episodes "
                         f"(e.g. {missing[:8]}); `fplus coc generate` writes templated labels")
    return {e: coc.texts[e] for e in needed_episodes}
