"""Where the matrix's runs go on one machine: MATRIX_DEVICES as slots, and a slot as a worker process's environment.

    MATRIX_DEVICES=auto                    every visible CUDA GPU (cuda:0,cuda:1,...), else cpu
    MATRIX_DEVICES=cuda:0,cuda:1,cpu       three slots: a run on each at a time
    MATRIX_DEVICES=cuda:0+cuda:1,cuda:2+cuda:3   two slots of 2 GPUs: each run launched by `accelerate launch`

A slot runs one run at a time in its own process; `cuda:N` is the N-th device this process sees (with
CUDA_VISIBLE_DEVICES set, the N-th entry of it), and the worker sees only its slot's devices (as cuda:0...).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fplus.errors import ConfigError
from fplus.settings import profiles_dirs

CUDA_VISIBLE = "CUDA_VISIBLE_DEVICES"


@dataclass(frozen=True)
class Slot:
    """One entry of MATRIX_DEVICES: `cpu`, or the CUDA device indices (as this process numbers them) of one run."""

    gpus: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        return "+".join(f"cuda:{i}" for i in self.gpus) if self.gpus else "cpu"

    @property
    def processes(self) -> int:
        """Training processes of a run on this slot (one per GPU; cpu: one)."""
        return max(1, len(self.gpus))

    def environ(self, parent: dict[str, str] | None = None) -> dict[str, str]:
        """The environment variables that pin a worker to this slot: CUDA_VISIBLE_DEVICES (empty for cpu, so that
        the worker sees no GPU at all), mapped through the parent's own CUDA_VISIBLE_DEVICES when it has one."""
        parent = os.environ if parent is None else parent
        if not self.gpus:
            return {CUDA_VISIBLE: ""}
        visible = [v.strip() for v in parent.get(CUDA_VISIBLE, "").split(",") if v.strip()]
        if CUDA_VISIBLE in parent and parent[CUDA_VISIBLE].strip():
            missing = [i for i in self.gpus if i >= len(visible)]
            if missing:
                raise ConfigError(f"MATRIX_DEVICES names cuda:{missing[0]} but CUDA_VISIBLE_DEVICES="
                                  f"{parent[CUDA_VISIBLE]} shows {len(visible)} GPU(s) "
                                  f"(cuda:0..cuda:{len(visible) - 1})")
            return {CUDA_VISIBLE: ",".join(visible[i] for i in self.gpus)}
        return {CUDA_VISIBLE: ",".join(str(i) for i in self.gpus)}

    def eval_device(self, setting: str) -> str:
        """EVAL_DEVICE inside the worker: a specific `cuda:K` names the parent's numbering, so it becomes the slot's
        first GPU (`cuda`); a cpu slot evaluates on the cpu; `auto`, `cpu` and `cuda` stay as set."""
        if not self.gpus:
            return "cpu" if setting.startswith("cuda") else setting
        return "cuda" if setting.startswith("cuda:") else setting


def visible_gpus() -> int:
    """CUDA devices this process sees (torch is imported for this)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_slots(devices: list[str], gpus: int | None = None) -> tuple[list[Slot], bool]:
    """MATRIX_DEVICES as slots, and whether the runs go in this process one after another (today's sequential
    matrix): a single slot that is cuda:0 (what training in this process uses), or cpu on a machine without a GPU
    (on one with a GPU, cpu is pinned in a worker that sees none). `gpus`: the visible GPU count (default: asked
    from torch when needed). A named GPU that does not exist is a ConfigError."""
    count = gpus
    if devices == ["auto"]:
        count = visible_gpus() if count is None else count
        slots = [Slot((i,)) for i in range(count)] or [Slot()]
    else:
        slots = [Slot() if g == "cpu" else Slot(tuple(int(p.split(":")[1]) for p in g.split("+"))) for g in devices]
        if any(s.gpus for s in slots):
            count = visible_gpus() if count is None else count
            for i in sorted({i for s in slots for i in s.gpus}):
                if i >= count:
                    raise ConfigError(f"MATRIX_DEVICES names cuda:{i} but this machine shows {count} CUDA GPU(s)"
                                      + (f" (cuda:0..cuda:{count - 1})" if count else "; use cpu"))
    if len(slots) != 1:
        return slots, False
    if slots[0].gpus:
        return slots, slots[0].gpus == (0,)
    return slots, (visible_gpus() if count is None else count) == 0


def accelerate_config(value: str) -> Path:
    """MATRIX_ACCELERATE_CONFIG as a file: a .yaml path, or a name looked up as accelerate/<name>.yaml in the
    profile directories (`fplus.settings.profiles_dirs`)."""
    as_path = Path(value)
    if as_path.suffix in (".yaml", ".yml"):
        if as_path.is_file():
            return as_path
        raise ConfigError(f"MATRIX_ACCELERATE_CONFIG={value}: no such file; pass an accelerate config .yaml or a "
                          "name in profiles/accelerate/ (ddp, fsdp, deepspeed)")
    for d in profiles_dirs():
        candidate = d / "accelerate" / f"{value}.yaml"
        if candidate.is_file():
            return candidate
    names = sorted({p.stem for d in profiles_dirs() if (d / "accelerate").is_dir()
                    for p in (d / "accelerate").glob("*.yaml")})
    raise ConfigError(f"MATRIX_ACCELERATE_CONFIG={value}: no accelerate config of that name; valid names: "
                      f"{', '.join(names) or 'none found'} (or a .yaml path)")
