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


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _episode_index(record: dict) -> int | None:
    if "episode_index" in record:
        value = record["episode_index"]
        return value if _is_index(value) else None
    value = record["episode_id"]
    if _is_index(value):
        return value
    if not isinstance(value, str):
        return None
    match = re.fullmatch(r"(?:episode_)?(\d+)", value)
    return int(match.group(1)) if match else None


def _type_name(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def read_coc(path: Path) -> CocFile:
    """Parse a CoC JSONL file; every problem becomes a line-numbered `CocProblem`.

    Problem kinds: `json` (not UTF-8 or not JSON), `schema` (not an object, both or neither id key, an unknown
    field, a wrong-typed id or text, a missing text), `empty` (blank coc_text), `duplicate` (an episode labelled
    again; the message names the line of the first label, which is the one kept). Blank lines are skipped.
    A record with an unknown field is still read (the problem is reported); the other problems drop the line.
    """
    path = Path(path)
    if not path.is_file():
        raise FplusError(f"CoC file {path} not found")
    out = CocFile(path)
    with path.open("rb") as f:
        for n, raw_bytes in enumerate(f, start=1):
            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as err:
                out.problems.append(CocProblem(n, "json", f"not UTF-8 text ({err.reason} at byte {err.start})"))
                continue
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as err:
                out.problems.append(CocProblem(n, "json", f"not valid JSON ({err.msg} at column {err.colno})"))
                continue
            if not isinstance(record, dict):
                out.problems.append(CocProblem(n, "schema", f"a line must be a JSON object, got {_type_name(record)}"))
                continue
            ids = [k for k in ID_KEYS if k in record]
            if len(ids) != 1:
                what = "has both episode_index and episode_id" if ids else "has neither episode_index nor episode_id"
                out.problems.append(CocProblem(n, "schema", f"{what}; a line needs exactly one of them"))
                continue
            unknown = sorted(set(record) - {*ID_KEYS, TEXT_KEY})
            if unknown:
                out.problems.append(CocProblem(
                    n, "schema", f"unknown field(s) {unknown}; allowed: episode_index or episode_id, {TEXT_KEY}"))
            episode = _episode_index(record)
            if episode is None:
                value = record[ids[0]]
                expected = ("a non-negative integer" if ids[0] == "episode_index"
                            else "a non-negative integer or 'episode_<digits>'")
                out.problems.append(CocProblem(
                    n, "schema", f"{ids[0]} must be {expected}, got {value!r} ({_type_name(value)})"))
                continue
            if TEXT_KEY not in record:
                out.problems.append(CocProblem(n, "schema", f"episode {episode}: missing {TEXT_KEY}"))
                continue
            text = record[TEXT_KEY]
            if not isinstance(text, str):
                out.problems.append(CocProblem(
                    n, "schema", f"episode {episode}: {TEXT_KEY} must be a string, got {_type_name(text)}"))
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
