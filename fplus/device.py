"""Which torch device a command runs on: `auto` (or not given) is cuda when available, else cpu."""

from __future__ import annotations

AUTO = "auto"


def resolve_device(device: str | None) -> str:
    """None or "auto" -> "cuda" when available, else "cpu"; anything else (cpu, cuda, cuda:1, mps) as given.

    torch is imported only to answer "auto".
    """
    if device is None or device == AUTO:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
