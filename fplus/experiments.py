"""Experiments E0-E4 (DESIGN 6): named, frozen specs; each is a set of overrides of the one settings tree, trained
by the one training loop.

| id | prophet + L_world | injection | CoC | FLARE align |
|----|----|----|----|----|
| E0 VLM-BC baseline   | - | - | - | - |
| E1 aux world loss    | x | - | - | - |
| E2 Model F           | x | x | - | - |
| E3 CoC without world | - | - | x | - |
| E4 full F+           | x | x | x | x |

Every question about what a run needs is asked of its spec, never of raw setting strings:
`Experiment.of(settings)` is the spec the settings actually describe (after every layer and override), so
`needs_world`, `needs_coc` and `has_memory` are answered the same way by the recipe, the matrix, the closed loop and
the doctor.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from fplus.errors import ConfigError

CUSTOM = "custom"


@dataclass(frozen=True)
class Experiment:
    """One experiment: which parts of the F+ policy exist.

    Attributes: id (E0..E4, or `custom` for flags that match no named experiment), description, and the four
    switches prophet (Prophet + L_world), injection (gated memory cross-attention), coc (CoC text loss) and
    flare_align (<FUT_j> alignment to future latents).
    """

    id: str
    description: str
    prophet: bool
    injection: bool
    coc: bool
    flare_align: bool

    def __post_init__(self) -> None:
        if self.injection and not self.prophet:
            raise ConfigError(f"{self.id}: an injection needs the Prophet (the injected memory is its prediction)")

    @property
    def needs_world(self) -> bool:
        """World latents are read (Prophet inputs and targets, FLARE targets): the latents cache must exist."""
        return self.prophet or self.flare_align

    @property
    def needs_coc(self) -> bool:
        """A CoC text loss is trained: COC_JSONL must name the labels."""
        return self.coc

    @property
    def has_memory(self) -> bool:
        """A memory reaches the actions: the corruption modes other than `none` can change them."""
        return self.injection

    def overrides(self) -> dict[str, str]:
        """The settings this experiment sets, by flat name (the `experiment` layer of `load_settings`)."""
        flags = {"PROPHET": self.prophet, "INJECTION": self.injection, "COC": self.coc,
                 "FLARE_ALIGN": self.flare_align}
        return {k: str(v).lower() for k, v in flags.items()}

    @classmethod
    def of(cls, settings: Any) -> Experiment:
        """The spec a resolved `Settings` tree describes: its model flags, named after EXPERIMENT when they are that
        experiment's, else after the named experiment with the same flags, else `custom`."""
        m = settings.model
        flags = (m.prophet, m.injection, m.coc, m.flare_align)
        named = settings.train.experiment
        if named in EXPERIMENTS and EXPERIMENTS[named].flags == flags:
            return EXPERIMENTS[named]
        for spec in EXPERIMENTS.values():
            if spec.flags == flags:
                return spec
        return cls(CUSTOM, "custom flags", *flags)

    @property
    def flags(self) -> tuple[bool, bool, bool, bool]:
        return (self.prophet, self.injection, self.coc, self.flare_align)


EXPERIMENTS: dict[str, Experiment] = {e.id: e for e in (
    Experiment("E0", "VLM-BC baseline", prophet=False, injection=False, coc=False, flare_align=False),
    Experiment("E1", "aux world loss only", prophet=True, injection=False, coc=False, flare_align=False),
    Experiment("E2", "Model F (Prophet + gated injection)", prophet=True, injection=True, coc=False,
               flare_align=False),
    Experiment("E3", "CoC without world", prophet=False, injection=False, coc=True, flare_align=False),
    Experiment("E4", "full F+ (world + injection + CoC + FLARE)", prophet=True, injection=True, coc=True,
               flare_align=True),
)}
DEFAULT_MATRIX = ("E0", "E2", "E4")


def get_experiment(name: str) -> Experiment:
    """The named experiment; an unknown name is a ConfigError with a did-you-mean and the valid names."""
    if name in EXPERIMENTS:
        return EXPERIMENTS[name]
    close = difflib.get_close_matches(name, list(EXPERIMENTS), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise ConfigError(f"unknown experiment {name!r}{hint}; valid experiments: {', '.join(EXPERIMENTS)}")


def check_experiments(names: list[str]) -> list[Experiment]:
    """The specs of `names` (MATRIX_EXPERIMENTS, --experiments); the first unknown name fails as in
    `get_experiment`."""
    return [get_experiment(n) for n in names]
