"""Small file helpers shared across fplus."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from fplus.errors import FplusError


def file_sha256(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes, read in chunks (never the whole file in memory)."""
    h = hashlib.sha256()
    buffer = bytearray(chunk_bytes)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            h.update(view[:n])
    return h.hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory, fsync'd and renamed into place:
    readers see the old content or the new one, never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: Path, what: str, fix: str = "") -> Any:
    """The JSON content of `path`, or an FplusError naming the file, the line and column, and `fix` (what to do).

    `what` describes the file ("the run configuration"); `fix` is appended after a semicolon."""
    path = Path(path)
    tail = f"; {fix}" if fix else ""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FplusError(f"{what} {path} is missing{tail}") from None
    except OSError as err:
        raise FplusError(f"cannot read {what} {path}: {err.strerror or err}{tail}") from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise FplusError(f"{what} {path} is not UTF-8 text (byte {err.start} is {raw[err.start]:#04x}); it is "
                         f"damaged{tail}") from None
    if not text.strip():
        raise FplusError(f"{what} {path} is empty (a write cut off?){tail}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        cut = " (cut off?)" if err.pos >= len(text.rstrip()) or err.msg.startswith("Unterminated string") else ""
        raise FplusError(f"{what} {path} is not valid JSON{cut}: line {err.lineno} column {err.colno}: {err.msg}"
                         f"{tail}") from None
