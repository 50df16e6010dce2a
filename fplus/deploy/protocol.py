"""The wire format of openpi's policy server: msgpack with numpy arrays, packed exactly as openpi's `msgpack_numpy`
(openpi-client 0.1.2, `openpi_client/msgpack_numpy.py`), so that `openpi_client.websocket_client_policy` reads
what `fplus serve` writes and the other way round. Torch-free.

    np.ndarray  -> {b"__ndarray__": True, b"data": arr.tobytes(), b"dtype": arr.dtype.str, b"shape": arr.shape}
    np.generic  -> {b"__npgeneric__": True, b"data": x.item(), b"dtype": x.dtype.str}
    anything else: msgpack's own types (dict, list, str, bytes, int, float, bool, None)

The keys are msgpack bin (Python bytes), the dtype a numpy type string such as "<f4" or "|u1"; arrays are C-order
bytes. Void, object and complex arrays are refused by both sides (openpi refuses them when packing; `unpack_array`
here refuses them when unpacking too, so a crafted message cannot make numpy build an object array). Unpacked
arrays are read-only views of the message buffer (openpi's `np.ndarray(buffer=...)`): copy before writing.
"""

from __future__ import annotations

import functools
from typing import Any

import msgpack
import numpy as np

_REFUSED_KINDS = ("V", "O", "c")


def pack_array(obj: Any) -> Any:
    """msgpack `default` hook: numpy arrays and scalars as openpi's dicts; other objects are returned unchanged
    (msgpack then raises TypeError for what it cannot pack)."""
    if isinstance(obj, np.ndarray | np.generic) and obj.dtype.kind in _REFUSED_KINDS:
        raise ValueError(f"Unsupported dtype: {obj.dtype}")
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    return obj


def unpack_array(obj: dict) -> Any:
    """msgpack `object_hook`: openpi's array and scalar dicts back to numpy (ValueError or TypeError when they are
    malformed: a buffer that does not fit the shape, a refused or unknown dtype)."""
    if b"__ndarray__" in obj:
        dtype = np.dtype(obj[b"dtype"])
        if dtype.kind in _REFUSED_KINDS:
            raise ValueError(f"Unsupported dtype: {dtype}")
        return np.ndarray(buffer=obj[b"data"], dtype=dtype, shape=obj[b"shape"])
    if b"__npgeneric__" in obj:
        dtype = np.dtype(obj[b"dtype"])
        if dtype.kind in _REFUSED_KINDS:
            raise ValueError(f"Unsupported dtype: {dtype}")
        return dtype.type(obj[b"data"])
    return obj


Packer = functools.partial(msgpack.Packer, default=pack_array)
packb = functools.partial(msgpack.packb, default=pack_array)
unpackb = functools.partial(msgpack.unpackb, object_hook=unpack_array)
