"""Count host syncs: calls that read a tensor's value back to Python (`item`, `tolist`, `bool`, `float`, `int`,
`numpy`), which on an accelerator block the host until the device has finished every queued kernel.

    with SyncCounter() as syncs:
        ...
    syncs.total, syncs.by_site   # {"fplus/train/recipe.py:288 (item)": 3, ...}
    SyncCounter(qualified=True)  # sites as "fplus/train/recipe.py:TrainRecipe._finite"

On CPU nothing waits, but the calls are the same ones: counting them on CPU shows what would stall a GPU. Each call
is attributed to the innermost frame outside torch (the code that asked for the value); calls made while another
counted call runs (e.g. `float` calling `item`) count once.
"""

from __future__ import annotations

import sys
import threading
from collections import Counter

import torch

METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")


class SyncCounter:
    """Patch the value-reading methods of torch.Tensor for the duration of a `with` block (main thread only)."""

    def __init__(self, qualified: bool = False):
        self.qualified = qualified  # sites as file:Class.function (stable across versions) instead of file:line
        self.by_site: Counter[str] = Counter()
        self._originals: dict[str, object] = {}
        self._depth = threading.local()

    @property
    def total(self) -> int:
        return sum(self.by_site.values())

    def _site(self, method: str) -> str:
        frame = sys._getframe(2)
        while frame is not None and ("/torch/" in frame.f_code.co_filename or
                                     frame.f_code.co_filename.endswith("sync_counter.py")):
            frame = frame.f_back
        if frame is None:
            return f"? ({method})"
        path = frame.f_code.co_filename
        for marker in ("/site-packages/", "/work/main/", "/fplus/"):
            if marker in path:
                path = path.split(marker, 1)[1] if marker != "/fplus/" else "fplus/" + path.split(marker, 1)[1]
                break
        if self.qualified:
            return f"{path}:{frame.f_code.co_qualname}"
        return f"{path}:{frame.f_lineno} ({method.strip('_')})"

    def _wrap(self, method: str, original):
        counter = self

        def wrapped(tensor, *args, **kwargs):
            if threading.current_thread() is threading.main_thread() and not getattr(counter._depth, "n", 0):
                if tensor.numel() > 0 or method != "tolist":
                    counter.by_site[counter._site(method)] += 1
            counter._depth.n = getattr(counter._depth, "n", 0) + 1
            try:
                return original(tensor, *args, **kwargs)
            finally:
                counter._depth.n -= 1

        return wrapped

    def __enter__(self) -> SyncCounter:
        for method in METHODS:
            original = getattr(torch.Tensor, method)
            self._originals[method] = original
            setattr(torch.Tensor, method, self._wrap(method, original))
        return self

    def __exit__(self, *exc) -> None:
        for method, original in self._originals.items():
            setattr(torch.Tensor, method, original)
        self._originals.clear()
