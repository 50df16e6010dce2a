"""Experiments E0-E4 (DESIGN 6): named overrides of the one settings tree, trained by the one training loop.

| id | prophet + L_world | injection | CoC | FLARE align |
|----|----|----|----|----|
| E0 VLM-BC baseline   | - | - | - | - |
| E1 aux world loss    | x | - | - | - |
| E2 Model F           | x | x | - | - |
| E3 CoC without world | - | - | x | - |
| E4 full F+           | x | x | x | x |
"""

from __future__ import annotations

EXPERIMENTS: dict[str, dict[str, str]] = {
    "E0": {"PROPHET": "false", "INJECTION": "false", "COC": "false", "FLARE_ALIGN": "false"},
    "E1": {"PROPHET": "true", "INJECTION": "false", "COC": "false", "FLARE_ALIGN": "false"},
    "E2": {"PROPHET": "true", "INJECTION": "true", "COC": "false", "FLARE_ALIGN": "false"},
    "E3": {"PROPHET": "false", "INJECTION": "false", "COC": "true", "FLARE_ALIGN": "false"},
    "E4": {"PROPHET": "true", "INJECTION": "true", "COC": "true", "FLARE_ALIGN": "true"},
}
DESCRIPTIONS = {
    "E0": "VLM-BC baseline",
    "E1": "aux world loss only",
    "E2": "Model F (Prophet + gated injection)",
    "E3": "CoC without world",
    "E4": "full F+ (world + injection + CoC + FLARE)",
}
DEFAULT_MATRIX = ("E0", "E2", "E4")
