"""Templated CoC text: one sentence per phase, in order, each saying why it follows from the goal.

    compose_text("pull the drawer open by its handle", phases, "full")
    -> "The goal is to pull the drawer open by its handle. First the hand moves along +x to the drawer (steps 0-17),
        because it must touch the drawer before it can pull it open. Then it stays in contact and moves the drawer
        along -y (steps 18-49), because that is how to pull the drawer open by its handle. Finally the hand slows
        down and stays still (steps 50-59), because the drawer is open and more motion would undo it."

`parse_task` splits the instruction by a small rule set into goals, one per object handled (`Goal`): the verb, the
object (none when only the hand moves: "move the gripper to the goal position"), the result ("open" in "pull the
drawer open"), the destination ("on the plate") and a description of where the object is ("on the coffee
machine"). Styles, richest first: `full` (sentences with step ranges), `plain` (sentences), `short` (one clause per
phase), `minimal` (the phase names). Every style names each phase's direction of motion, so two episodes of one task
with different phase sequences get different texts. `compose_text` is deterministic; `fit_text` returns the first
style whose text fits the token budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from fplus.coc.phases import Phase
from fplus.errors import ConfigError, DataError

STYLES = ("full", "plain", "short", "minimal")
PARTICLES = {"up", "down", "on", "off", "out", "over"}
PARTICLE_VERBS = {"pick", "turn", "put", "take", "lift", "switch", "knock", "flip", "set"}
SEPARABLE_VERBS = {"pick", "take"}  # "pick the ring up": verb "pick up"
VERBS = {"pick", "put", "place", "push", "pull", "open", "close", "shut", "turn", "press", "slide", "sweep", "lift",
         "insert", "use", "hammer", "drop", "move", "reach", "stack", "grasp", "grab", "take", "rotate", "flip", "hang",
         "lock", "unlock", "switch", "wipe", "pour", "fold", "bring", "carry", "set", "knock", "throw", "lower",
         "raise", "drag", "stir", "unplug", "plug", "remove", "return"}
# verbs whose location phrase says where the object ends up ("push the mug under the machine"); for the others it
# says where the object is ("press the button on the coffee machine")
PLACING_VERBS = {"put", "place", "drop", "move", "push", "pull", "slide", "sweep", "lift", "insert", "carry", "bring",
                 "stack", "hang", "throw", "set", "hammer", "reach", "drag", "lower", "raise", "knock", "return"}
IMPLIED_RESULTS = {"open": "open", "close": "closed", "shut": "closed", "turn on": "on", "turn off": "off",
                   "switch on": "on", "switch off": "off"}
DETERMINERS = {"the", "a", "an", "its", "their", "both", "all", "this", "that", "these", "those", "each"}
PRONOUNS = {"it", "them"}
HAND_WORDS = {"gripper", "hand", "arm", "effector", "end-effector", "fingers"}
DEST_PREPS = ("on top of", "in front of", "next to", "out of", "into", "onto", "inside", "toward", "towards", "under",
              "underneath", "behind", "between", "beside", "above", "below", "near", "off", "on", "in", "at", "to")
PATH_PREPS = ("around", "past", "over", "through", "across", "along")
OTHER_PREPS = ("from", "with", "by", "using", "via", "for")
PREPS = sorted(DEST_PREPS + PATH_PREPS + OTHER_PREPS, key=lambda p: -len(p.split()))
SOURCE_PREPS = {"from", "off", "out of"}  # where a picked-up object comes from
STATE_WORDS = {"open", "closed", "shut"}  # adjectives of an object's state ("the open door")
RESULT_WORDS = {"open", "closed", "shut", "down", "up", "in", "out", "on", "off", "inside"}
DIRECTION_WORDS = {"left", "right", "up", "down", "forward", "forwards", "backward", "backwards", "back", "away",
                   "clockwise", "counterclockwise", "upward", "downward", "sideways", "aside"}
SIDE_WORDS = {"left", "right", "side", "front", "back", "top", "bottom", "above", "below", "behind"}  # "from the side"
CLAUSE_BREAKS = {"and", "then", ","}
AT_PLACE = {"to": "at", "into": "in", "onto": "on", "toward": "near", "towards": "near"}  # "to the goal" -> "at ..."
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")


@dataclass(frozen=True)
class Goal:
    """What the task wants done to one object: verb ("pull"), object ("the drawer"; "" when only the hand moves),
    result ("open" or ""), destination with its preposition ("on the plate" or ""), where the object is ("on the
    coffee machine" or ""), the path of the hand ("over the wall" or "") and the clause's own text."""

    verb: str
    obj: str
    result: str = ""
    dest: str = ""
    where: str = ""
    via: str = ""
    text: str = ""

    @property
    def hand_only(self) -> bool:
        """True when the goal moves the hand itself ("reach the goal position"), not an object."""
        return not self.obj

    def verb_phrase(self, what: str = "it", third: bool = False) -> str:
        """The verb with `what` and the result: "pull it open", "pick it up", "open it", "turn the dial"; `third`:
        "pulls it open"."""
        head, *particle = self.verb.split()
        implied = (IMPLIED_RESULTS.get(self.verb), *particle)  # "open it", not "open it open"
        result = [self.result] if self.result and self.result not in implied else []
        return " ".join([_third(head) if third else head, what, *particle, *result])

    @property
    def place(self) -> str:
        """Where the object ends up, as a state: "at the goal" for "to the goal", "in the hole" for "into the hole"."""
        if not self.dest:
            return ""
        first, _, rest = self.dest.partition(" ")
        return f"{AT_PLACE.get(first, first)} {rest}".strip()

    @property
    def target(self) -> str:
        """The destination's noun phrase ("the hole in the table" for "into the hole in the table"), else "the goal"."""
        for prep in PREPS:
            if self.dest.startswith(prep + " "):
                return self.dest[len(prep) + 1:]
        return self.dest or "the goal"

    @property
    def state(self) -> str:
        """The object's end state ("open", "at the goal"), or "" when the task names none."""
        return self.place or self.result

    @property
    def outcome(self) -> str:
        """The end state as a clause ("the drawer is open"), or ""."""
        return f"{self.obj or 'the hand'} is {self.state}" if self.state else ""


@dataclass(frozen=True)
class TaskParts:
    """A task instruction split for the templates: its normalised text and its goals in order, one per object
    (clauses on the same object merge: "pick up the cup and place it on the plate" is one goal). The first goal's
    fields are also properties: `verb`, `obj`, `result`, `dest`, `where`."""

    text: str
    goals: tuple[Goal, ...]

    @property
    def verb(self) -> str:
        return self.goals[0].verb

    @property
    def obj(self) -> str:
        return self.goals[0].obj

    @property
    def result(self) -> str:
        return self.goals[0].result

    @property
    def dest(self) -> str:
        return self.goals[0].dest

    @property
    def where(self) -> str:
        return self.goals[0].where


def _third(verb: str) -> str:
    """Third person singular of a verb: "push" -> "pushes", "carry" -> "carries", "pull" -> "pulls"."""
    if verb.endswith(("s", "sh", "ch", "x", "z", "o")):
        return verb + "es"
    if verb.endswith("y") and verb[-2:-1] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def _prep_at(words: Sequence[str], i: int) -> str:
    """The (longest) preposition starting at words[i], or ""."""
    for prep in PREPS:
        n = len(prep.split())
        if " ".join(words[i:i + n]) == prep:
            return prep
    return ""


def _starts_noun(words: Sequence[str], i: int) -> bool:
    """Whether a noun phrase starts at words[i] (so "in" before it is a preposition, not the result "in")."""
    if i >= len(words):
        return False
    word = words[i]
    return word in DETERMINERS or word in PRONOUNS or not (
        word in RESULT_WORDS or word in DIRECTION_WORDS or word == "to" or _prep_at(words, i))


def _noun_phrase(words: Sequence[str], i: int) -> tuple[list[str], int]:
    """The noun phrase starting at words[i] ("the top drawer of the cabinet", "the plate and the ramekin") and the
    index after it: it ends at a preposition, a result or direction word, "to", or a second determiner ("a" in "the
    dial a quarter turn"); words right after the determiner always belong to it ("the open door", "the left bin")."""
    phrase: list[str] = []
    while i < len(words):
        word = words[i]
        has_noun = any(w not in DETERMINERS for w in phrase)
        if has_noun and (word in RESULT_WORDS or word in DIRECTION_WORDS or word == "to" or _prep_at(words, i)
                         or (word in DETERMINERS and phrase[-1] not in ("and", "or", "of"))):
            break
        if not phrase and (word == "to" or _prep_at(words, i)):
            break
        phrase.append(word)
        i += 1
    return phrase, i


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def _parse_clause(words: list[str], prev: Goal | None) -> tuple[Goal, list[str]]:
    """One clause ("pull the drawer open by its handle") as a goal, and the words of the purpose clause after "to"
    ("use it to push the box": ["push", "the", "box"]) or []. "it" refers to `prev`'s object (for "open"/"close":
    to `prev`'s destination, as in "put the bowl in the drawer and close it")."""
    verb, i = words[0], 1
    if verb in PARTICLE_VERBS and len(words) > 2 and words[1] in PARTICLES:
        verb, i = f"{verb} {words[1]}", 2
    obj_words, i = _noun_phrase(words, i)
    obj = " ".join(obj_words)
    referent = "the object" if prev is None else prev.obj or prev.target
    if obj in PRONOUNS:
        opens = verb in IMPLIED_RESULTS and prev is not None and prev.dest
        obj = prev.target if opens else referent
    hand = verb == "reach" or (bool(obj_words) and obj_words[-1] in HAND_WORDS)
    placing = hand or verb in PLACING_VERBS
    result = dest = where = via = ""
    purpose: list[str] = []
    while i < len(words):
        word, prep = words[i], _prep_at(words, i)
        if word == "to" and i + 1 < len(words) and words[i + 1] in VERBS:  # "to lock it", "to push the box"
            purpose = words[i + 1:]
            break
        if prep and (prep not in RESULT_WORDS or _starts_noun(words, i + len(prep.split()))):
            phrase, i = _noun_phrase(words, i + len(prep.split()))
            if not phrase and i < len(words):  # "from above"
                phrase, i = [words[i]], i + 1
            if len(phrase) == 1 and phrase[0] in PRONOUNS:  # "put the moka pot on it"
                phrase = referent.split()
            text = " ".join([prep, *phrase])
            if (phrase and phrase[-1] in SIDE_WORDS and len(phrase) <= 2) or prep in OTHER_PREPS:
                continue  # how, not where: "to the left", "from the side", "by its handle"
            if placing and prep in PATH_PREPS:
                via = _join(via, text)
            elif placing:
                dest = _join(dest, text)
            elif prep not in SOURCE_PREPS and not result:
                where = _join(where, text)
        elif word in RESULT_WORDS:
            if verb in SEPARABLE_VERBS and word in PARTICLES:
                verb = f"{verb} {word}"
            elif not result:
                result = word
            i += 1
        elif word in DETERMINERS:  # a measure: "a quarter turn"
            i = _noun_phrase(words, i)[1]
        else:  # a direction or manner word: "sideways", "back"
            i += 1
    if verb in SEPARABLE_VERBS:
        verb = f"{verb} up"
    result = result or IMPLIED_RESULTS.get(verb, "")
    if result and len(obj_words) > 2:  # "push the open door closed": the door ends up closed
        obj = " ".join(w for w in obj.split() if w not in STATE_WORDS)
    if hand:
        dest = dest or (f"to {obj}" if obj and obj_words[-1] not in HAND_WORDS else "")
        obj = ""
    elif not obj:
        obj = "the object"
    return Goal(verb=verb, obj=obj, result=result, dest=dest, where=where, via=via, text=" ".join(words)), purpose


def _split_clauses(words: list[str]) -> list[list[str]]:
    """Clauses at "and", "then" or a comma before a verb ("pick up the cup and place it ..."), not inside a noun
    phrase ("between the plate and the ramekin")."""
    clauses: list[list[str]] = [[]]
    for k, word in enumerate(words):
        following = next((w for w in words[k + 1:] if w not in CLAUSE_BREAKS), "")
        if word in CLAUSE_BREAKS and (following in VERBS or word == ","):
            if clauses[-1] and following in VERBS:
                clauses.append([])
            continue
        clauses[-1].append(word)
    return [c for c in clauses if c]


def parse_task(task: str) -> TaskParts:
    """The goals of a task instruction (see `TaskParts`, `Goal`); a missing object is "the object"."""
    text = " ".join(task.strip().rstrip(".").split())
    if len(text) > 1 and not text[:2].isupper():
        text = text[0].lower() + text[1:]
    words = text.replace(",", " , ").split()
    if not words:
        raise DataError("an episode has an empty task text; CoC labels need the instruction")
    goals: list[Goal] = []
    pending = [(clause, False) for clause in _split_clauses(words)]  # (words, is a purpose: "... to open it")
    while pending:
        prev = goals[-1] if goals else None
        clause, is_purpose = pending.pop(0)
        goal, purpose = _parse_clause(clause, prev)
        if purpose:
            pending.insert(0, (purpose, True))
        if prev is None or goal.obj != prev.obj or goal.hand_only:
            goals.append(goal)
        elif not is_purpose:  # "pick up the cup and place it on the plate"; "... to open it" only says why
            goals[-1] = replace(prev, result=goal.result or prev.result, dest=goal.dest or prev.dest,
                                via=goal.via or prev.via)
    # "reach past the wall and push the button": the button is the goal; the hand's way there is not
    kept = [g for g in goals if not g.hand_only] or [g for g in goals if g.dest] or goals[:1]
    return TaskParts(text=text, goals=tuple(kept))


# -- texts -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Step:
    """One phase in its episode, with what its sentence needs: the goal it serves (one goal per grasp cycle when the
    task has as many goals as the episode has cycles, else the first goal), its opener and its context."""

    phase: Phase
    goal: Goal
    opener: str          # "First ", "Then ", "Next ", "Finally ", or "" for a single phase
    first: bool          # the episode's first phase
    again: bool          # this goal was released before: a new grip on the same object
    nth: int             # how many grasps of this goal so far, this one included
    contact: bool        # the episode pushes rather than grasps (it has a contact phase)
    grasp_next: bool     # a grasp follows in this cycle
    moves_next: bool     # a contact or move phase follows: this approach is not the last leg
    held: bool           # a move with no grasp before it in its cycle: the gripper closed from the episode start
    next_goal: Goal | None  # for a release before another cycle: that cycle's goal
    done: bool           # this goal is the task's last one
    later: tuple[Goal, ...]  # goals no cycle of their own serves ("hammer the nail" after "pick up the hammer")
    task: str            # the task text


def _opener(i: int, n: int) -> str:
    if n == 1:
        return ""
    if i == 0:
        return "First "
    if i == n - 1:
        return "Finally "
    return "Then " if i % 2 else "Next "


def _plan(parts: TaskParts, phases: Sequence[Phase]) -> list[_Step]:
    """Every phase as a `_Step`. A grasp cycle ends with a release that is not the episode's last phase."""
    cycles, k = [], 0
    for i, phase in enumerate(phases):
        cycles.append(k)
        k += phase.name == "release" and i < len(phases) - 1
    goals = parts.goals
    # one cycle per goal when each goal has an end state ("open the drawer and put the bowl inside"), not when one
    # is a tool ("pick up the hammer and hammer the nail": the hammer stays in the hand)
    own = len(goals) > 1 and cycles[-1] + 1 == len(goals) and all(g.state for g in goals)
    goal_of = [goals[c] if own else goals[0] for c in cycles]
    steps = []
    for i, phase in enumerate(phases):
        goal = goal_of[i]
        before = [p.name for p, g in zip(phases[:i], goal_of, strict=False) if g == goal]
        in_cycle = [(j, p.name) for j, p in enumerate(phases) if cycles[j] == cycles[i]]
        after = [name for j, name in in_cycle if j > i]
        release_before_next = phase.name == "release" and i < len(phases) - 1
        steps.append(_Step(
            phase=phase, goal=goal, opener=_opener(i, len(phases)), first=i == 0, again="release" in before,
            nth=1 + before.count("grasp"), contact=any(p.name == "contact" for p in phases),
            grasp_next="grasp" in after, moves_next=any(p.name in ("contact", "move") for p in phases[i + 1:]),
            held=not any(name == "grasp" for j, name in in_cycle if j < i),
            next_goal=goal_of[i + 1] if release_before_next else None, done=goal == goals[-1],
            later=() if own else goals[1:], task=parts.text))
    return steps


def _dir(phase: Phase) -> str:
    return f" {phase.direction}" if phase.direction else ""


def _steps(phase: Phase) -> str:
    last = phase.stop - 1
    return f" (step {phase.start})" if phase.start == last else f" (steps {phase.start}-{last})"


def _nth(n: int) -> str:
    """ " a second time" for the 2nd grasp of an object, "" for the first."""
    if n == 1:
        return ""
    return f" a {ORDINALS[n - 1]} time" if n <= len(ORDINALS) else f" a {n}th time"


def _carry(what: str, dest: str) -> str:
    """ "the cup to the goal" / "the cup until it is on the plate" (a destination's place, not a path)."""
    if dest.split()[0] in ("to", "toward", "towards", "into", "onto"):
        return f"{what} {dest}"
    return f"{what} until it is {dest}"


def _why(s: _Step) -> str:
    """Why the motion follows from the goal: the end state, else the task."""
    g = s.goal
    if g.place:
        return f"because {g.obj} must end up {g.place}"
    return f"because the goal needs {g.obj} {g.result}" if g.result else f"because that is how to {s.task}"


def _hand_way(s: _Step) -> str:
    """Where a hand-only goal sends the hand: "over the wall to the goal position", or "... toward ..." when more
    motion follows."""
    g = s.goal
    return _join(g.via, g.dest if g.dest and not s.moves_next else f"toward {g.target}")


def _sentence(s: _Step, with_steps: bool) -> str:
    """The sentence of one phase (styles `full` and `plain`)."""
    g, p, op = s.goal, s.phase, s.opener
    obj, d, steps = g.obj, _dir(s.phase), _steps(s.phase) if with_steps else ""
    hand = f"{op}the hand"
    drift = f" while the hand drifts {p.direction}" if p.direction else ""
    if p.name == "approach" and g.hand_only:
        text = f"{hand} moves{d} {_hand_way(s)}{steps}, because the task is done once the hand is there."
    elif p.name == "approach" and s.again:
        text = f"{hand} moves{d} back to {obj}{steps}, because the goal is not reached yet."
    elif p.name == "approach":
        to = _join(obj, g.where)
        text = (f"{hand} moves{d} to {to}{steps}, because it must touch {obj} before it can {g.verb_phrase()}."
                if s.contact else
                f"{hand} moves{d} to {to}{steps}, because it must reach {obj} before the gripper can close on it."
                if s.grasp_next else
                f"{hand} moves{d} to {to} and {g.verb_phrase(third=True)}{steps}, {_why(s)}.")
    elif p.name == "grasp" and g.hand_only:
        text = f"{op}the gripper closes{drift}{steps}, so that the fingers stay together on the way {_hand_way(s)}."
    elif p.name == "grasp":
        text = f"{op}the gripper closes on {obj}{_nth(s.nth)}{drift}{steps}, so that {obj} moves with the hand."
    elif p.name == "move" and g.hand_only:
        text = (f"{hand} moves{d} {_hand_way(s)} with the gripper closed{steps}, "
                "because the task is done once the hand is there.")
    elif p.name == "move":
        why = f"so as to {s.later[0].text}" if s.later and not g.state else _why(s)
        until = f" until {g.outcome}" if g.outcome else ""
        if s.held:  # closed from the first frame: holding the object, or pressing with a closed gripper
            text = f"{hand}, its gripper closed from the start, moves{d}{steps}{until}, {why}."
        elif g.dest:
            text = f"{hand} carries {_carry(obj + d, g.dest)}{steps}, {why}."
        elif g.result:
            text = f"{hand} moves {obj}{d} while holding it{steps}{until}, because the goal needs it {g.result}."
        else:
            text = f"{hand} moves {obj}{d} while holding it{steps}, {why}."
    elif p.name == "release":
        lets_go = "" if g.hand_only else f" and lets go of {obj}"
        text = f"{op}the gripper opens{lets_go}{drift}{steps}, {_release_why(s, short=False)}."
    elif p.name == "contact":
        who = hand if s.first else f"{op}it"
        text = (f"{who} turns and moves{d}{steps}, because {g.target} lies that way." if g.hand_only else
                f"{who} stays in contact and moves {obj}{d}{steps}, because that is how to {s.task}.")
    elif p.name == "settle":
        still = f"stays nearly still, drifting slightly {p.direction}" if p.direction else "stays still"
        text = (f"{hand} slows down and {still}{steps}, because {g.outcome or 'the goal is reached'} "
                "and more motion would undo it.")
    else:
        raise ValueError(f"unknown phase {p.name!r}")
    return text[:1].upper() + text[1:]


def _release_why(s: _Step, short: bool) -> str:
    """Why the gripper opens: a new grip, the next object, or the goal (`short`: the wording of a clause)."""
    if s.next_goal is not None and s.next_goal != s.goal:
        free = s.next_goal.obj or "the next motion"
        return f"to be free for {free}" if short else f"so that the hand is free for {free}"
    if s.next_goal is not None:
        return "to take a new grip" if short else "so that the hand can take a new grip"
    if short:
        return f"since {s.goal.outcome}" if s.goal.outcome and not s.done else "since the goal is reached"
    if s.goal.outcome:
        return f"because {s.goal.outcome}" + (" and the goal is reached" if s.done else "")
    return "because the goal is reached and the hand must let go"


def _clause(s: _Step) -> str:
    """The clause of one phase (style `short`)."""
    g, p = s.goal, s.phase
    obj, d = g.obj, _dir(p)
    drift = f" while drifting {p.direction}" if p.direction else ""
    if p.name == "approach" and g.hand_only:
        return f"move{d} {_hand_way(s)}, as reaching it is the goal"
    if p.name == "approach" and s.again:
        return f"move{d} back to {obj}, as the goal is not reached yet"
    if p.name == "approach":
        return (f"move{d} to {obj}, as it must be touched first" if s.contact else
                f"move{d} to {obj}, as it must be reached first" if s.grasp_next else
                f"move{d} to {obj} and {g.verb_phrase()}, as that does the task")
    if p.name == "grasp" and g.hand_only:
        return f"close the gripper{drift}, to keep the fingers together"
    if p.name == "grasp":
        return f"close the gripper{_nth(s.nth)}{drift}, so {obj} moves with the hand"
    if p.name == "move" and g.hand_only:
        return f"move{d} {_hand_way(s)} with the gripper closed"
    if p.name == "move" and s.held:
        return f"move{d} with the gripper closed " + (f"until {g.outcome}" if g.outcome else f"to {g.verb_phrase(obj)}")
    if p.name == "move":
        return (f"carry {_carry('it' + d, g.dest)}" if g.dest else f"move it{d} until it is {g.result}" if g.result
                else f"move it{d}, so as to {s.later[0].text}" if s.later else f"move it{d}, as that does the task")
    if p.name == "release":
        return f"open the gripper{drift}, {_release_why(s, short=True)}"
    if p.name == "contact" and g.hand_only:
        return f"turn and move{d}, as {g.target} lies that way"
    if p.name == "contact":
        return f"move it{d}, as that does the task"
    if p.name == "settle":
        return f"stay still{drift}, since the goal is reached"
    raise ValueError(f"unknown phase {p.name!r}")


def compose_text(task: str, phases: Sequence[Phase], style: str = "full") -> str:
    """The CoC text of an episode in one style (see the module docstring)."""
    if not phases:
        raise DataError("an episode has no phases (no frames)")
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; valid: {', '.join(STYLES)}")
    parts = parse_task(task)
    steps = _plan(parts, phases)
    if style in ("full", "plain"):
        return " ".join([f"The goal is to {parts.text}.", *(_sentence(s, with_steps=style == "full") for s in steps)])
    if style == "short":
        clauses = "; ".join(_clause(s) for s in steps)
        return f"Goal: {parts.text}. {clauses[:1].upper()}{clauses[1:]}."
    names = ", ".join(p.name + _dir(p) for p in phases)
    return f"Goal: {parts.text}. {names[:1].upper()}{names[1:]}, each enabling the next."


def fit_text(task: str, phases: Sequence[Phase], fits: Callable[[str], bool]) -> tuple[str, str]:
    """(text, style) of the richest style whose text `fits` (the token budget); ConfigError when none does."""
    for style in STYLES:
        text = compose_text(task, phases, style)
        if fits(text):
            return text, style
    raise ConfigError(f"even the shortest CoC text does not fit COC_MAX_TOKENS for task {task!r} "
                      f"({text!r}); raise COC_MAX_TOKENS")
