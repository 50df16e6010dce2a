"""Chain-of-causation (CoC) labels: a JSONL file, one episode per line.

    {"episode_index": 12, "coc_text": "approach the drawer handle, because ..."}
    {"episode_id": "episode_000013", "coc_text": "..."}      (episode_id: an int or `episode_<digits>`)

`read_coc` parses leniently and reports every problem with its line number; training uses `load_coc`, which
refuses a file with problems or one that misses an episode it needs. Both stream the file line by line with a
line-size cap (`line_cap_bytes`), so a huge or binary file is rejected quickly in bounded memory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from fplus.errors import DataError

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


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# The longest line a CoC file may hold, from the longest text allowed: COC_MAX_TOKENS tokens x CHARS_PER_TOKEN
# characters (a generous ceiling: English BPE averages about 4) x BYTES_PER_CHAR bytes (the worst case, a
# JSON-escaped character, \uXXXX) + LINE_OVERHEAD bytes for the id and field names, and never less than
# MIN_LINE_CAP. With the default COC_MAX_TOKENS=128 that is 64 KiB; a longer line is reported and skipped unread.
CHARS_PER_TOKEN = 16
BYTES_PER_CHAR = 6
LINE_OVERHEAD = 4096
MIN_LINE_CAP = 64 * 1024
READ_CHUNK = 64 * 1024  # how much of an over-long line is read at a time while skipping it
MAX_PROBLEMS = 1000  # problems kept per file; the rest are counted (a binary file would otherwise fill memory)


def line_cap_bytes(max_tokens: int | None = None) -> int:
    """The line-size cap of a CoC file for COC_MAX_TOKENS=`max_tokens` (None: the setting's default)."""
    if max_tokens is None:
        from fplus.settings import CocSettings

        max_tokens = CocSettings.model_fields["max_tokens"].default
    return max(MIN_LINE_CAP, LINE_OVERHEAD + max_tokens * CHARS_PER_TOKEN * BYTES_PER_CHAR)


def iter_capped_lines(f: BinaryIO, cap: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, bytes, size) of each line of a binary file, in bounded memory: a line longer than `cap` bytes
    (without its newline) is never held whole: it is read past in READ_CHUNK pieces and yielded as bytes=None with
    its size. A line's bytes include its newline."""
    n = 0
    while True:
        chunk = f.readline(cap + 2)  # the line, its CR LF, and one byte to tell an over-long line
        if not chunk:
            return
        n += 1
        if chunk.endswith(b"\n") or len(chunk) < cap + 2:  # the whole line (or the last one)
            size = len(chunk.rstrip(b"\r\n"))
            yield n, chunk if size <= cap else None, size
            continue
        size = len(chunk)
        del chunk
        while True:
            more = f.readline(READ_CHUNK)
            size += len(more)
            if not more or more.endswith(b"\n"):
                size -= len(more) - len(more.rstrip(b"\r\n"))
                break
        yield n, None, size


def read_coc(path: Path, *, max_tokens: int | None = None) -> CocFile:
    """Parse a CoC JSONL file, streaming; every problem becomes a line-numbered `CocProblem`.

    Problem kinds: `line_too_long` (a line over `line_cap_bytes(max_tokens)` bytes: skipped without being read
    into memory), `json` (not UTF-8, binary, or not JSON), `schema` (not an object, both or neither id key, an
    unknown field, a wrong-typed id or text, a missing text), `empty` (blank coc_text), `duplicate` (an episode
    labelled again; the message names the line of the first label, which is the one kept), `truncated` (more
    than MAX_PROBLEMS problems: the rest are only counted). Blank lines are skipped. A record with an unknown
    field is still read (the problem is reported); the other problems drop the line.
    Raises FplusError when the file is missing or unreadable.
    """
    path = Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "not found"
        raise DataError(f"CoC file {path} {what}: pass a JSONL file (FILE or COC_JSONL)")
    cap = line_cap_bytes(max_tokens)
    out = CocFile(path)
    omitted = 0

    def problem(n: int, kind: str, message: str) -> None:
        nonlocal omitted
        if len(out.problems) < MAX_PROBLEMS:
            out.problems.append(CocProblem(n, kind, message))
        else:
            omitted += 1

    try:
        with path.open("rb") as f:
            for n, raw_bytes, size in iter_capped_lines(f, cap):
                if raw_bytes is None:
                    problem(n, "line_too_long", f"line of {size:,} bytes, over the {cap:,}-byte limit of a CoC line "
                                                f"(set by COC_MAX_TOKENS, see docs/coc.md); skipped")
                    continue
                _parse_line(n, raw_bytes, out, problem)
    except OSError as err:
        raise DataError(f"cannot read CoC file {path}: {err.strerror or err}") from None
    if omitted:
        out.problems.append(CocProblem(0, "truncated", f"{omitted:,} more problem(s) not listed (only the first "
                                                       f"{MAX_PROBLEMS} are kept); is it the right file?"))
    return out


def _parse_line(n: int, raw_bytes: bytes, out: CocFile, problem: Callable[[int, str, str], None]) -> None:
    """Check one line (at most the cap long) and add its label to `out`, or report its problem."""
    if n == 1:
        if raw_bytes.startswith((b"\xff\xfe", b"\xfe\xff")):
            problem(n, "json", "the file is UTF-16 (byte order mark); save it as UTF-8")
            return
        raw_bytes = raw_bytes.removeprefix(b"\xef\xbb\xbf")
    nul = raw_bytes.find(b"\x00")
    if nul >= 0:
        problem(n, "json", f"binary data (a NUL byte at column {nul + 1}), not JSON text; save the file as UTF-8 "
                           "JSON lines")
        return
    try:
        raw = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as err:
        problem(n, "json", f"not UTF-8 text ({err.reason} at column {err.start + 1}); save the file as UTF-8")
        return
    if not raw.strip():
        return
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as err:
        problem(n, "json", f"not valid JSON ({err.msg} at column {err.colno})")
        return
    except RecursionError:
        problem(n, "json", "not valid JSON (nested too deeply)")
        return
    except ValueError as err:  # e.g. an integer of more than 4300 digits
        problem(n, "json", f"not valid JSON ({str(err).split(';')[0][:80]})")
        return
    if not isinstance(record, dict):
        problem(n, "schema", f"a line must be a JSON object, got {_type_name(record)}")
        return
    ids = [k for k in ID_KEYS if k in record]
    if len(ids) != 1:
        what = "has both episode_index and episode_id" if ids else "has neither episode_index nor episode_id"
        problem(n, "schema", f"{what}; a line needs exactly one of them")
        return
    unknown = sorted(set(record) - {*ID_KEYS, TEXT_KEY})
    if unknown:
        shown = _short(unknown[:5], 120) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        problem(n, "schema", f"unknown field(s) {shown}; allowed: episode_index or episode_id, {TEXT_KEY}")
    episode = _episode_index(record)
    if episode is None:
        value = record[ids[0]]
        expected = ("a non-negative integer" if ids[0] == "episode_index"
                    else "a non-negative integer or 'episode_<digits>'")
        problem(n, "schema", f"{ids[0]} must be {expected}, got {_short(value)} ({_type_name(value)})")
        return
    if TEXT_KEY not in record:
        problem(n, "schema", f"episode {episode}: missing {TEXT_KEY}")
        return
    text = record[TEXT_KEY]
    if not isinstance(text, str):
        problem(n, "schema", f"episode {episode}: {TEXT_KEY} must be a string, got {_type_name(text)}")
        return
    if not text.strip():
        problem(n, "empty", f"episode {episode}: empty {TEXT_KEY}")
        return
    if episode in out.texts:
        problem(n, "duplicate", f"episode {episode} already labelled on line {out.lines[episode]}")
        return
    out.texts[episode] = text.strip()
    out.lines[episode] = n


def load_coc(path: Path, needed_episodes: list[int], *, max_tokens: int | None = None) -> dict[int, str]:
    """The CoC text of every needed episode (read by `read_coc`, the reader `fplus coc validate` uses); any problem
    in the file or a missing episode is an error."""
    coc = read_coc(path, max_tokens=max_tokens)
    if coc.problems:
        shown = "; ".join(str(p) for p in coc.problems[:5])
        more = f" (+{len(coc.problems) - 5} more)" if len(coc.problems) > 5 else ""
        raise DataError(f"{path}: {shown}{more}. Run `fplus coc validate {path}` for the full report")
    missing = sorted(set(needed_episodes) - set(coc.texts))
    if missing:
        raise DataError(f"{path} has no CoC text for {len(missing)} of {len(needed_episodes)} training episodes "
                         f"(e.g. {missing[:8]}); `fplus coc generate` writes templated labels")
    return {e: coc.texts[e] for e in needed_episodes}
