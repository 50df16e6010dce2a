"""Injected faults of CoC files: huge lines, binary and non-UTF-8 bytes, pathological JSON, floods of problems.

`fplus coc validate` (validate_coc) and training (load_coc) read through the same streaming reader (read_coc),
so each fault is checked through both where it matters.
"""

from __future__ import annotations

import json
import os
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from fplus.coc.validate import validate_coc
from fplus.data.coc import (
    BYTES_PER_CHAR,
    CHARS_PER_TOKEN,
    LINE_OVERHEAD,
    MAX_PROBLEMS,
    MIN_LINE_CAP,
    line_cap_bytes,
    load_coc,
    read_coc,
)
from fplus.errors import FplusError

HUGE = 20 * 1024 * 1024  # the audit's 20 MB line


def good(episode: int, text: str = "approach the handle, because the drawer opens by it") -> bytes:
    return (json.dumps({"episode_index": episode, "coc_text": text}) + "\n").encode()


def write_huge_line_file(path: Path, *, newline_at_end: bool = True) -> Path:
    """Line 1 good, line 2 a 20 MB coc_text, line 3 good (written in pieces: the test itself stays small)."""
    with path.open("wb") as f:
        f.write(good(0))
        f.write(b'{"episode_index": 1, "coc_text": "')
        piece = b"x" * (1024 * 1024)
        for _ in range(HUGE // len(piece)):
            f.write(piece)
        f.write(b'"}\n' if newline_at_end else b'"}')
        if newline_at_end:
            f.write(good(2))
    return path


def kinds(coc) -> list[tuple[int, str]]:
    return [(p.line, p.kind) for p in coc.problems]


def peak_memory(fn: Callable[[], object]) -> tuple[object, int]:
    """(fn(), the peak of Python allocations in bytes while it ran)."""
    line_cap_bytes()  # import the settings module before measuring
    tracemalloc.start()
    try:
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


def test_line_cap_follows_coc_max_tokens():
    assert line_cap_bytes(128) == MIN_LINE_CAP == 64 * 1024
    assert line_cap_bytes() == line_cap_bytes(128)  # the setting's default
    assert line_cap_bytes(1000) == LINE_OVERHEAD + 1000 * CHARS_PER_TOKEN * BYTES_PER_CHAR > MIN_LINE_CAP


def test_a_20mb_line_is_rejected_in_bounded_memory(tmp_path):
    path = write_huge_line_file(tmp_path / "huge.jsonl")
    coc, peak = peak_memory(lambda: read_coc(path))
    assert peak < 50 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    assert kinds(coc) == [(2, "line_too_long")]
    size = HUGE + len('{"episode_index": 1, "coc_text": ""}')
    assert coc.problems[0].message == (f"line of {size:,} bytes, over the 65,536-byte limit of a CoC line (set by "
                                       "COC_MAX_TOKENS, see docs/coc.md); skipped")
    assert sorted(coc.texts) == [0, 2]  # the lines around it are read


def test_validate_and_training_reject_the_huge_line_the_same_way(tmp_path):
    path = write_huge_line_file(tmp_path / "huge.jsonl")
    report, peak = peak_memory(lambda: validate_coc(path, max_tokens=128, counter=None))
    assert peak < 4 * 2**20, f"peak {peak / 2**20:.1f} MiB"  # the 20 MiB line is skipped unread
    assert [(p.line, p.kind) for p in report.errors] == [(2, "line_too_long")]
    assert report.to_dict()["errors"][0]["kind"] == "line_too_long"
    with pytest.raises(FplusError, match=r"huge\.jsonl: line 2: line of 20,971,556 bytes, over the 65,536-byte "
                                         r"limit.*Run `fplus coc validate"):
        load_coc(path, [0, 2])


def test_a_huge_last_line_without_newline(tmp_path):
    path = write_huge_line_file(tmp_path / "tail.jsonl", newline_at_end=False)
    coc = read_coc(path)
    assert kinds(coc) == [(2, "line_too_long")] and sorted(coc.texts) == [0]


def test_the_cap_boundary_is_exact(tmp_path):
    cap = line_cap_bytes(128)
    envelope = len(json.dumps({"episode_index": 0, "coc_text": ""}))
    at_cap = json.dumps({"episode_index": 0, "coc_text": "a" * (cap - envelope)})
    over = json.dumps({"episode_index": 1, "coc_text": "a" * (cap - envelope + 1)})
    assert len(at_cap) == cap and len(over) == cap + 1
    path = tmp_path / "edge.jsonl"
    path.write_bytes(f"{at_cap}\r\n{over}\n".encode())  # CRLF does not count against the cap
    coc = read_coc(path, max_tokens=128)
    assert sorted(coc.texts) == [0] and kinds(coc) == [(2, "line_too_long")]
    assert f"line of {cap + 1:,} bytes" in coc.problems[0].message
    assert sorted(read_coc(path, max_tokens=1000).texts) == [0, 1]  # a larger COC_MAX_TOKENS allows more


def test_binary_and_non_utf8_lines_are_reported_with_their_line(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(good(0) + os.urandom(64).replace(b"\n", b"") + b"\x00\n" + good(1)
                     + b'{"episode_index": 2, "coc_text": "caf\xe9"}\n' + good(3))
    coc = read_coc(path)
    assert kinds(coc) == [(2, "json"), (4, "json")] and sorted(coc.texts) == [0, 1, 3]
    assert "binary data (a NUL byte at column" in coc.problems[0].message
    assert coc.problems[1].message.startswith("not UTF-8 text (invalid continuation byte at column 38)")
    assert "save the file as UTF-8" in coc.problems[1].message


def test_a_binary_file_without_newlines(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(os.urandom(3 * 1024 * 1024).replace(b"\n", b"\x00"))
    report, peak = peak_memory(lambda: validate_coc(path, max_tokens=128, counter=None))
    assert peak < 1 * 2**20, f"peak {peak / 2**20:.1f} MiB"  # read in bounded pieces, never the whole 3 MiB line
    assert [(p.line, p.kind) for p in report.errors] == [(1, "line_too_long"), (0, "no_labels")]


def test_utf16_file_and_utf8_bom(tmp_path):
    utf16 = tmp_path / "u16.jsonl"
    utf16.write_bytes(good(0).decode().encode("utf-16"))
    coc = read_coc(utf16)
    assert kinds(coc)[0] == (1, "json") and "UTF-16" in coc.problems[0].message
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + good(0) + good(1))
    assert read_coc(bom).problems == [] and sorted(read_coc(bom).texts) == [0, 1]


def test_pathological_json_is_a_problem_not_a_crash(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_bytes(b"[" * 50000 + b"\n"  # deeper than the parser's recursion limit
                     + b'{"episode_index": ' + b"1" * 5000 + b', "coc_text": "x"}\n'  # > 4300 digits
                     + b'{"episode_index": NaN, "coc_text": "x"}\n'
                     + good(0))
    coc = read_coc(path)
    assert kinds(coc) == [(1, "json"), (2, "json"), (3, "schema")] and sorted(coc.texts) == [0]
    assert coc.problems[0].message == "not valid JSON (nested too deeply)"
    assert coc.problems[1].message.startswith("not valid JSON (Exceeds the limit (4300 digits)")


def test_messages_stay_short_for_long_values(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"episode_id": "e" * 30000, "coc_text": "x"}) + "\n"
                    + json.dumps({"episode_index": 0, "coc_text": "x", **{f"k{i}": i for i in range(2000)}}) + "\n")
    coc = read_coc(path)
    assert kinds(coc) == [(1, "schema"), (2, "schema")]
    assert all(len(p.message) < 300 for p in coc.problems), [len(p.message) for p in coc.problems]
    assert "(+1995 more)" in coc.problems[1].message


def test_a_flood_of_problems_is_capped(tmp_path):
    path = tmp_path / "flood.jsonl"
    path.write_bytes(b"not json\n" * (MAX_PROBLEMS + 500) + good(0))
    coc = read_coc(path)
    assert len(coc.problems) == MAX_PROBLEMS + 1 and sorted(coc.texts) == [0]
    assert (coc.problems[-1].line, coc.problems[-1].kind) == (0, "truncated")
    assert coc.problems[-1].message.startswith("500 more problem(s) not listed (only the first 1000 are kept)")
    report = validate_coc(path, max_tokens=128, counter=None)
    assert report.errors[-1].kind == "truncated"


def test_missing_directory_and_unreadable_files(tmp_path, monkeypatch):
    with pytest.raises(FplusError, match=r"CoC file .*nope\.jsonl not found"):
        read_coc(tmp_path / "nope.jsonl")
    with pytest.raises(FplusError, match=r"CoC file .* is not a file"):
        load_coc(tmp_path, [0])
    path = tmp_path / "ok.jsonl"
    path.write_bytes(good(0))

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(FplusError, match=r"cannot read CoC file .*ok\.jsonl: Permission denied"):
        validate_coc(path, max_tokens=128, counter=None)
