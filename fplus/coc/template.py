"""Templated CoC text: one sentence per phase, each saying why it follows from the goal.

    compose_text("open the drawer", phases, fits=lambda t: counter.count(t) <= 128)
    -> "The goal is to open the drawer. First the hand approaches the drawer (steps 0-17), because it must touch
        the drawer before it can open it. Then it stays in contact and moves the drawer along -y (steps 18-49), ..."

The task text is split into verb, object and destination by a small rule set (`parse_task`). Styles, richest
first: `full` (sentences with step ranges), `plain` (sentences), `short` (one clause per phase), `minimal` (the
phase names). `compose_text` returns the first style whose text fits the token budget.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fplus.coc.phases import Phase
from fplus.errors import FplusError

STYLES = ("full", "plain", "short", "minimal")
PARTICLES = {"up", "down", "on", "off", "out", "over"}
PARTICLE_VERBS = {"pick", "turn", "put", "take", "lift", "switch", "knock", "flip", "set"}
DEST_PREPS = ("on top of", "in front of", "next to", "into", "onto", "inside", "toward", "towards", "under",
              "behind", "over", "above", "below", "on", "in", "to")
OTHER_PREPS = ("out of", "from", "off", "with", "at", "along", "until", "by")
CLAUSE_BREAKS = (" and ", " then ", ", ")
DIRECTION_WORDS = {"left", "right", "up", "down", "forward", "forwards", "backward", "backwards", "back", "away",
                   "clockwise", "counterclockwise", "upward", "downward"}


@dataclass(frozen=True)
class TaskParts:
    """A task split for the templates: text ("open the drawer"), verb ("open"), object ("the drawer"),
    destination with its preposition ("on the plate") or ""."""

    text: str
    verb: str
    obj: str
    dest: str


def _find_prep(text: str, preps: Sequence[str]) -> tuple[int, str] | None:
    """Earliest whole-word preposition in `text` (longest first at the same position)."""
    best: tuple[int, str] | None = None
    for prep in preps:
        match = re.search(rf"(?:^|\s){re.escape(prep)}\s", text + " ")
        if match is None:
            continue
        if best is None or (match.start(), -len(prep)) < (best[0], -len(best[1])):
            best = (match.start(), prep)
    return best


def parse_task(task: str) -> TaskParts:
    """Verb, object and destination of a task instruction (see `TaskParts`); a missing object is "the object"."""
    text = " ".join(task.strip().rstrip(".").split())
    if len(text) > 1 and not text[:2].isupper():
        text = text[0].lower() + text[1:]
    words = text.split()
    if not words:
        raise FplusError("an episode has an empty task text; CoC labels need the instruction")
    n_verb = 2 if len(words) > 2 and words[0] in PARTICLE_VERBS and words[1] in PARTICLES else 1
    verb, rest = " ".join(words[:n_verb]), " ".join(words[n_verb:])
    head, tail = rest, ""
    cuts = sorted((rest.find(sep), sep) for sep in CLAUSE_BREAKS if rest.find(sep) > 0)
    if cuts:
        at, sep = cuts[0]
        head, tail = rest[:at], rest[at + len(sep):]
    obj, dest = head, ""
    found = _find_prep(head, DEST_PREPS + OTHER_PREPS)
    if found is not None:
        at, prep = found
        obj = head[:at].strip()
        if prep in DEST_PREPS:
            dest = head[at:].strip()
    obj_words = obj.split()
    while len(obj_words) > 1 and obj_words[-1] in DIRECTION_WORDS:  # "move the square right": "the square"
        obj_words.pop()
    obj = " ".join(obj_words)
    if not dest and tail:
        found = _find_prep(tail, DEST_PREPS)
        if found is not None:
            dest = tail[found[0]:].strip()
    return TaskParts(text=text, verb=verb, obj=obj or "the object", dest=dest)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _carry(obj: str, dest: str) -> str:
    """ "the cup to the goal" / "the cup until it is on the plate" (a destination's place, not a path)."""
    if dest.split()[0] in ("to", "toward", "towards", "into", "onto"):
        return f"{obj} {dest}"
    return f"{obj} until it is {dest}"


def _steps(phase: Phase) -> str:
    last = phase.stop - 1
    return f" (step {phase.start})" if phase.start == last else f" (steps {phase.start}-{last})"


def _opener(i: int, n: int) -> str:
    if n == 1:
        return ""
    if i == 0:
        return "First "
    if i == n - 1:
        return "Finally "
    return "Then " if i % 2 else "Next "


def _sentence(phase: Phase, parts: TaskParts, i: int, phases: Sequence[Phase], with_steps: bool) -> str:
    obj, dest, task = parts.obj, parts.dest, parts.text
    steps = _steps(phase) if with_steps else ""
    direction = f" {phase.direction}" if phase.direction else ""
    opener = _opener(i, len(phases))
    subject = f"{opener}the hand" if opener else "The hand"
    seen = [p.name for p in phases[:i]]
    has_contact = any(p.name == "contact" for p in phases)
    if phase.name == "approach" and "release" in seen:
        return f"{subject} approaches {obj} again{steps}, because the goal is not reached yet."
    if phase.name == "approach" and has_contact:
        return f"{subject} approaches {obj}{steps}, because it must touch {obj} before it can {parts.verb} it."
    if phase.name == "approach" and any(p.name == "grasp" for p in phases):
        return f"{subject} approaches {obj}{steps}, because it must reach {obj} before the gripper can close on it."
    if phase.name == "approach":
        return f"{subject} moves toward {obj}{direction}{steps}, because the task is done once the hand is at {obj}."
    if phase.name == "grasp":
        return _cap(f"{opener}the gripper closes on {obj}{steps}, so that {obj} moves with the hand.")
    if phase.name == "move" and i == 0:
        return f"The hand already holds {obj} and carries it{direction}{steps}, because that is how to {task}."
    if phase.name == "move" and dest:
        return f"{subject} carries {_carry(obj, dest)}{steps}, because the goal needs {obj} {dest}."
    if phase.name == "move":
        return f"{subject} moves {obj}{direction} while holding it{steps}, because that is how to {task}."
    if phase.name == "release" and i < len(phases) - 1:
        return _cap(f"{opener}the gripper opens{steps} and lets go of {obj}, so that the hand can take a new grip.")
    if phase.name == "release":
        why = f"{obj} is {dest} and the goal is reached" if dest else "the goal is reached and the hand must let go"
        return _cap(f"{opener}the gripper opens{steps} and lets go of {obj}, because {why}.")
    if phase.name == "contact":
        return _cap(f"{opener}it stays in contact and moves {obj}{direction}{steps}, because that is how to {task}.")
    if phase.name == "settle":
        return (f"{subject} slows down and stays still{steps}, "
                "because the goal is reached and more motion would undo it.")
    raise ValueError(f"unknown phase {phase.name!r}")


def _clause(phase: Phase, parts: TaskParts, i: int, phases: Sequence[Phase]) -> str:
    obj, dest = parts.obj, parts.dest
    if phase.name == "approach" and any(p.name == "release" for p in phases[:i]):
        return f"approach {obj} again, as the goal is not reached yet"
    if phase.name == "release" and i < len(phases) - 1:
        return "open the gripper, to take a new grip"
    direction = f" {phase.direction}" if phase.direction else ""
    has_contact = any(p.name == "contact" for p in phases)
    clauses = {
        "approach": (f"approach {obj}, as it must be touched first" if has_contact else
                     f"approach {obj}, as it must be reached first" if len(phases) > 1 and
                     any(p.name == "grasp" for p in phases) else f"move to {obj}, as reaching it is the goal"),
        "grasp": f"close the gripper, so {obj} moves with the hand",
        "move": f"carry {_carry('it', dest)}, as the goal needs" if dest else f"move it{direction}, as the goal needs",
        "release": "open the gripper, since the goal is reached",
        "contact": f"move it{direction}, as that does the task",
        "settle": "stay still, since the goal is reached",
    }
    return clauses[phase.name]


def compose_text(task: str, phases: Sequence[Phase], style: str = "full") -> str:
    """The CoC text of an episode in one style (see the module docstring)."""
    if not phases:
        raise FplusError("an episode has no phases (no frames)")
    parts = parse_task(task)
    if style in ("full", "plain"):
        sentences = [_sentence(p, parts, i, phases, with_steps=style == "full") for i, p in enumerate(phases)]
        return " ".join([f"The goal is to {parts.text}.", *sentences])
    if style == "short":
        clauses = [_clause(p, parts, i, phases) for i, p in enumerate(phases)]
        return f"Goal: {parts.text}. " + _cap("; ".join(clauses)) + "."
    if style == "minimal":
        return f"Goal: {parts.text}. " + _cap(", ".join(p.name for p in phases)) + ", each enabling the next."
    raise ValueError(f"unknown style {style!r}; valid: {', '.join(STYLES)}")


def fit_text(task: str, phases: Sequence[Phase], fits: Callable[[str], bool]) -> tuple[str, str]:
    """(text, style) of the richest style whose text `fits` (the token budget); FplusError when none does."""
    for style in STYLES:
        text = compose_text(task, phases, style)
        if fits(text):
            return text, style
    raise FplusError(f"even the shortest CoC text does not fit COC_MAX_TOKENS for task {task!r} "
                     f"({text!r}); raise COC_MAX_TOKENS")
