"""CoC labels: validation (every fault kind, with line numbers), phase segmentation, generation, VLM prompt."""

from __future__ import annotations

import ast
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import fplus
from fplus.coc.generate import LabelJob, generate_coc, generate_from_settings, write_jsonl_atomic
from fplus.coc.phases import MotionSpec, Phase, closed_intervals, segment_episode
from fplus.coc.template import STYLES, compose_text, fit_text, parse_task
from fplus.coc.tokens import TokenCounter, approximate_count, load_token_counter
from fplus.coc.validate import compact_ranges, validate_coc
from fplus.coc.vlm import (
    VlmLabeler,
    build_messages,
    build_prompt,
    choose_frames,
    clean_generation,
    expand_image_tokens,
)
from fplus.data.coc import load_coc, read_coc
from fplus.data.lerobot import LeRobotDataset
from fplus.data.writer import LeRobotWriter
from fplus.errors import FplusError
from fplus.settings import load_settings

CAM = "observation.images.image"
STATE = "observation.state"
WORDS = TokenCounter(name="words", exact=True, count_fn=lambda text: len(text.split()))

# Meta-World-like episodes: (task, [(frames, (dx, dy, dz), grip)]), grip > 0 closes.
EPISODES = [
    ("pick up the red block and place it on the plate",
     [(8, (1, 0, -0.5), -1), (3, (0, 0, 0), 1), (8, (0, 1, 0.3), 1), (3, (0, 0, 0), -1), (3, (0, 0, 1), -1)]),
    ("push the puck to the goal", [(8, (1, 0, 0), -1), (8, (0, 1, 0), -1), (4, (0, 0, 0), -1)]),
    ("reach the goal position", [(10, (1, 0, 1), 0), (4, (0, 0, 0), 0)]),
    ("press the button from the top", [(7, (1, 1, 0), -1), (6, (0, 0, -1), -1), (3, (0, 0, 0), -1)]),
    ("put the cube in the bowl",  # a second grasp after a first release
     [(5, (1, 0, 0), -1), (2, (0, 0, 0), 1), (3, (0, 1, 0), 1), (2, (0, 0, 0), -1), (4, (-1, 0, 0), -1),
      (2, (0, 0, 0), 1), (3, (0, -1, 0), 1), (3, (0, 0, 0), -1)]),
]
EXPECTED_PHASES = [
    [("approach", 0, 8), ("grasp", 8, 11), ("move", 11, 19), ("release", 19, 25)],
    [("approach", 0, 8), ("contact", 8, 16), ("settle", 16, 20)],
    [("approach", 0, 10), ("settle", 10, 14)],
    [("approach", 0, 7), ("contact", 7, 13), ("settle", 13, 16)],
    [("approach", 0, 5), ("grasp", 5, 7), ("move", 7, 10), ("release", 10, 12), ("approach", 12, 16),
     ("grasp", 16, 18), ("move", 18, 21), ("release", 21, 24)],
]


def motion_episode(parts) -> tuple[np.ndarray, np.ndarray]:
    """Actions (T, 4) = (dx, dy, dz, grip) and state (T, 4) = (hand x, y, z, gripper opening)."""
    action = np.concatenate([np.tile(np.array([*d, g], np.float32), (n, 1)) for n, d, g in parts])
    pos = np.cumsum(np.concatenate([np.zeros((1, 3)), action[:-1, :3] * 0.01]), axis=0)
    opening = np.where(action[:, 3] > 0, 0.2, 1.0)[:, None]
    return action, np.concatenate([pos, opening], axis=1).astype(np.float32)


def write_motion_dataset(root: Path, episodes=EPISODES) -> LeRobotDataset:
    """A LeRobot v3.0 dataset with 4-dim Meta-World-like actions (gripper open/close events) and a 16 px camera."""
    w = LeRobotWriter(root, fps=10, features={
        CAM: {"dtype": "video", "shape": [16, 16, 3], "names": ["height", "width", "channels"]},
        STATE: {"dtype": "float32", "shape": [4], "names": ["x", "y", "z", "gripper"]},
        "action": {"dtype": "float32", "shape": [4], "names": ["dx", "dy", "dz", "grip"]}})
    for task, parts in episodes:
        action, state = motion_episode(parts)
        frames = np.zeros((len(action), 16, 16, 3), np.uint8)
        frames[:, :, :, 0] = np.linspace(0, 255, len(action), dtype=np.uint8)[:, None, None]
        w.add_episode(task, {CAM: frames, STATE: state, "action": action})
    return LeRobotDataset.open(w.finalize())


@pytest.fixture(scope="module")
def motion_ds(tmp_path_factory) -> LeRobotDataset:
    return write_motion_dataset(tmp_path_factory.mktemp("coc") / "ds")


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# -- validate ----------------------------------------------------------------------------------------------------


FAULTY = [
    '{"episode_index": 0, "coc_text": "approach the block, because it must be reached first"}',  # 1 ok
    '{"episode_index": 1, "coc_text": "push the puck"',                                           # 2 json
    '{"episode_index": 2, "episode_id": "episode_000002", "coc_text": "reach"}',                  # 3 both ids
    '{"episode_id": "episode_000000", "coc_text": "again"}',                                      # 4 duplicate of 1
    '{"episode_index": 3, "coc_text": "   "}',                                                    # 5 empty
    '{"episode_index": 4, "coc_text": "' + "word " * 30 + '"}',                                   # 6 too long
    '{"episode_index": 9, "coc_text": "not in the dataset"}',                                     # 7 unknown
    '{"episode_index": "2", "coc_text": "x"}',                                                    # 8 wrong type
    '{"coc_text": "no id"}',                                                                      # 9 no id
    '{"episode_index": 2, "coc_text": 5}',                                                        # 10 text type
    '{"episode_index": 2, "coc_text": "fine", "note": 1}',                                        # 11 extra field
    '',                                                                                           # 12 blank: ok
    '[1, 2]',                                                                                     # 13 not an object
]


def test_validate_reports_every_fault_kind_with_its_line(tmp_path, motion_ds):
    path = write_lines(tmp_path / "bad.jsonl", FAULTY)
    report = validate_coc(path, max_tokens=20, counter=WORDS, dataset=motion_ds)
    found = {(p.line, p.kind) for p in report.errors}
    assert found == {(2, "json"), (3, "schema"), (4, "duplicate"), (5, "empty"), (6, "too_long"),
                     (7, "unknown_episode"), (8, "schema"), (9, "schema"), (10, "schema"), (11, "schema"),
                     (13, "schema")}
    messages = {p.line: p.message for p in report.errors}
    assert "already labelled on line 1" in messages[4]
    assert "has both episode_index and episode_id" in messages[3]
    assert "30 tokens, more than COC_MAX_TOKENS=20" in messages[6]
    assert "episode 9 is not in the dataset (its episodes: 0-4)" in messages[7]
    assert "must be a non-negative integer, got '2' (string)" in messages[8]
    assert "neither" in messages[9] and "must be a string, got integer" in messages[10]
    assert "unknown field(s) ['note']" in messages[11]
    assert not report.ok and report.labels == 4  # episodes 0, 4, 9 and 2 (line 11, read despite its extra field)
    assert [p.line for p in report.errors] == sorted(p.line for p in report.errors)
    # coverage: episodes 1 and 3 have no valid label -> a warning, an error only when full coverage is required
    assert [(w.kind, w.message) for w in report.warnings] == [
        ("coverage", "2 of 5 dataset episodes have no label: 1, 3")]
    assert report.coverage.labelled == 3 and report.coverage.missing == [1, 3]
    strict = validate_coc(path, max_tokens=20, counter=WORDS, dataset=motion_ds, require_full_coverage=True)
    assert "coverage" in {p.kind for p in strict.errors} and not strict.warnings


def test_good_file_is_ok_and_to_dict_is_json(tmp_path, motion_ds):
    lines = [json.dumps({"episode_index": e, "coc_text": f"label {e}"}) for e in range(4)]
    lines.append(json.dumps({"episode_id": "episode_000004", "coc_text": "label 4"}))
    path = write_lines(tmp_path / "good.jsonl", lines)
    report = validate_coc(path, max_tokens=20, counter=WORDS, dataset=motion_ds, require_full_coverage=True)
    assert report.ok and not report.warnings and report.labels == 5
    assert report.coverage.fraction == 1.0 and report.tokens.max == 2
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] and data["coverage"]["missing"] == [] and data["tokens"]["exact"]
    assert load_coc(path, [0, 4]) == {0: "label 0", 4: "label 4"}  # training's reader agrees


def test_file_level_problems(tmp_path):
    empty = write_lines(tmp_path / "empty.jsonl", [""])
    report = validate_coc(empty, max_tokens=10, counter=None)
    assert [(p.line, p.kind) for p in report.errors] == [(0, "no_labels")] and report.tokens is None
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b'{"episode_index": 0, "coc_text": "ok"}\n\xff\xfe\n')
    assert [(p.line, p.kind) for p in read_coc(binary).problems] == [(2, "json")]
    with pytest.raises(FplusError, match="not found"):
        validate_coc(tmp_path / "missing.jsonl", max_tokens=10, counter=None)


def test_compact_ranges():
    assert compact_ranges([]) == ""
    assert compact_ranges([7, 0, 1, 2, 3, 9, 10]) == "0-3, 7, 9-10"
    assert compact_ranges(list(range(0, 40, 2)), max_ranges=3) == "0, 2, 4, ... (+17 more)"


def test_token_counters():
    assert approximate_count("one two three four five six seven eight nine ten") == 13
    counter = load_token_counter("some-owner/not-a-cached-model")  # HF_HUB_OFFLINE=1 in tests: falls back
    assert not counter.exact and counter.name == "approximate" and "approximate" in counter.note
    assert counter.count("a b c") == 4
    tiny = load_token_counter("tiny")
    assert tiny.exact and tiny.count("open the drawer") > 0
    with pytest.raises(FplusError, match="no 3B model"):
        load_token_counter("qwen3_vl_3b_instruct")


def test_approximate_counts_are_flagged(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", [json.dumps({"episode_index": 0, "coc_text": "word " * 20})])
    counter = load_token_counter("some-owner/not-a-cached-model")
    report = validate_coc(path, max_tokens=10, counter=counter)
    assert report.errors[0].kind == "too_long" and "~26 tokens" in report.errors[0].message
    assert "approximate count" in report.errors[0].message and report.to_dict()["tokens"]["exact"] is False


# -- phases ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(len(EPISODES)))
def test_phase_segmentation(index):
    action, state = motion_episode(EPISODES[index][1])
    for s in (state, None):  # from the state's hand position, or from the action's translation
        phases = segment_episode(action, s, MotionSpec())
        assert [(p.name, p.start, p.stop) for p in phases] == EXPECTED_PHASES[index]
    assert phases[0].start == 0 and phases[-1].stop == len(action)
    assert all(a.stop == b.start for a, b in zip(phases, phases[1:], strict=False))


def test_phase_directions():
    press = segment_episode(*motion_episode(EPISODES[3][1]), MotionSpec())
    assert press[1].direction == "down"
    push = segment_episode(*motion_episode(EPISODES[1][1]), MotionSpec())
    assert push[1].direction == "along +y"


def test_gripper_debounce_and_edges():
    assert closed_intervals(np.array([-1, 1, -1, -1, 1, 1, -1, 1, 1, 1]), 0.0, 2) == [(4, 10)]
    assert closed_intervals(np.array([1, 1, -1, 1, 1]), 0.0, 2) == [(0, 5)]  # a 1-frame gap is filled
    action, state = motion_episode([(6, (1, 0, 0), 1), (4, (0, 0, 0), -1)])  # holding from the first frame
    assert [p.name for p in segment_episode(action, state, MotionSpec())] == ["move", "release"]
    action, state = motion_episode([(5, (1, 0, 0), -1), (3, (0, 0, 0), 1), (5, (0, 0, 1), 1)])  # ends holding
    assert [(p.name, p.start, p.stop) for p in segment_episode(action, state, MotionSpec())] == [
        ("approach", 0, 5), ("grasp", 5, 8), ("move", 8, 13)]


def test_gripper_dim_threshold_and_no_gripper():
    action, state = motion_episode(EPISODES[0][1])
    moved = np.concatenate([action[:, 3:], action[:, :3]], axis=1)  # gripper first
    phases = segment_episode(moved, state, MotionSpec(gripper_dim=0))
    assert [(p.name, p.start, p.stop) for p in phases] == EXPECTED_PHASES[0]
    libero_01 = action.copy()
    libero_01[:, 3] = (action[:, 3] > 0).astype(np.float32)  # a 0 (open) / 1 (close) gripper
    assert [p.name for p in segment_episode(libero_01, state, MotionSpec(grip_threshold=0.5))] == [
        "approach", "grasp", "move", "release"]
    no_grip = segment_episode(action, state, MotionSpec(gripper_dim=None))
    assert {p.name for p in no_grip} <= {"approach", "contact", "settle"}
    with pytest.raises(FplusError, match="gripper dim 4"):
        segment_episode(action, state, MotionSpec(gripper_dim=4))
    with pytest.raises(FplusError, match="position dims"):
        segment_episode(action, state, MotionSpec(position_dims=(0, 7)))


# -- template ----------------------------------------------------------------------------------------------------


def metaworld_sentences() -> dict[str, str]:
    """TASK_DESCRIPTIONS of fplus.sim.metaworld, read from its source: importing the module needs the `sim` extra
    (mujoco), the sentences do not."""
    tree = ast.parse((Path(fplus.__file__).parent / "sim" / "metaworld.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "TASK_DESCRIPTIONS":
            return ast.literal_eval(node.value)
    raise AssertionError("TASK_DESCRIPTIONS not found in fplus/sim/metaworld.py")


MW_TASKS = metaworld_sentences()
LIBERO_TASKS = [
    "put the black bowl on the plate", "open the top drawer and put the bowl inside",
    "pick up the alphabet soup and place it in the basket", "turn on the stove and put the moka pot on it",
    "put the black bowl in the bottom drawer of the cabinet and close it", "put the wine bottle on top of the cabinet",
    "pick up the black bowl between the plate and the ramekin and place it on the plate",
    "push the plate to the front of the stove", "open the middle drawer of the cabinet",
]


def phase_seq(*spec: tuple[str, int, str]) -> list[Phase]:
    """Phases tiling [0, T) from (name, frames, direction)."""
    phases, start = [], 0
    for name, n, direction in spec:
        phases.append(Phase(name, start, start + n, direction))
        start += n
    return phases


# phase sequences of one task: same names with other directions, regrasps, holding from the start, push, reach
PHASE_SEQS = {
    "grip": phase_seq(("approach", 8, "along +x"), ("grasp", 3, "down"), ("move", 8, "up"), ("release", 6, "")),
    "grip_y": phase_seq(("approach", 8, "along +x"), ("grasp", 3, ""), ("move", 8, "along +y"), ("release", 6, "")),
    "regrasp": phase_seq(("approach", 5, "along +x"), ("grasp", 2, ""), ("move", 3, "along +y"), ("release", 2, ""),
                         ("approach", 4, "along -x"), ("grasp", 2, ""), ("move", 3, "along -y"), ("release", 3, "up")),
    "held": phase_seq(("move", 6, "along +x"), ("release", 4, "")),
    "holding_at_end": phase_seq(("approach", 5, "down"), ("grasp", 3, ""), ("move", 5, "up")),
    "contact": phase_seq(("approach", 8, "along +x"), ("contact", 8, "along +y"), ("settle", 4, "")),
    "contact_down": phase_seq(("approach", 7, "along +x"), ("contact", 6, "down"), ("settle", 3, "along +x")),
    "reach": phase_seq(("approach", 10, "up"), ("settle", 4, "")),
    "approach_only": phase_seq(("approach", 10, "along +y")),
}
BAD_FRAGMENTS = ["toward the gripper", "to the gripper", "approaches the drawer open", "the drawer open (",
                 "the drawer open,", "the door open (", "the open door is", "  ", " ,", " .", ",,", "..", ", ("]
DOUBLED = re.compile(r"\b(\w+) \1\b", re.IGNORECASE)  # "the the", "to to", "it it"


def test_parse_task():
    assert parse_task("Put the bowl on the plate.") == parse_task("put the bowl on the plate")
    p = parse_task("pick up the red cup and place it on the plate")
    assert (p.verb, p.obj, p.dest) == ("pick up", "the red cup", "on the plate")
    p = parse_task("press the button from the top")
    assert (p.verb, p.obj, p.dest) == ("press", "the button", "")
    assert parse_task("open the top drawer of the cabinet").obj == "the top drawer of the cabinet"
    assert parse_task("move the square right").obj == "the square"
    assert parse_task("push the puck to the goal").dest == "to the goal"
    # (verb, object, result, destination) of the first goal; the result is not part of the object
    for task, expected in {
        "pull the drawer open by its handle": ("pull", "the drawer", "open", ""),
        "push the open door closed": ("push", "the door", "closed", ""),
        "press the button down from above": ("press", "the button", "down", ""),
        "push the button in from the front": ("push", "the button", "in", ""),
        "reach past the wall and push the button in from the front": ("push", "the button", "in", ""),
        "slide the window open": ("slide", "the window", "open", ""),
        "turn the dial a quarter turn": ("turn", "the dial", "", ""),
        "turn the faucet handle to the left to open it": ("turn", "the faucet handle", "", ""),
        "pick the ring up off the peg": ("pick up", "the ring", "", ""),
        "pick the peg out of the hole and lift it to the goal": ("pick up", "the peg", "", "to the goal"),
        "pull the mug away from the coffee machine to the goal": ("pull", "the mug", "", "to the goal"),
        "sweep the puck off the edge of the table": ("sweep", "the puck", "", "off the edge of the table"),
        "pick up the puck and place it at the goal on the other side of the wall":
            ("pick up", "the puck", "", "at the goal on the other side of the wall"),
        "put the wine bottle on top of the cabinet": ("put", "the wine bottle", "", "on top of the cabinet"),
        "turn on the stove": ("turn on", "the stove", "on", ""),
    }.items():
        p = parse_task(task)
        assert (p.verb, p.obj, p.result, p.dest) == expected, task
    # the hand itself: no object, the destination is where the hand goes
    for task, dest in [("move the gripper to the goal position", "to the goal position"),
                       ("reach over the wall to the goal position", "to the goal position"),
                       ("move the gripper into the hole in the table", "into the hole in the table"),
                       ("reach the goal position", "to the goal position")]:
        p = parse_task(task)
        assert (p.obj, p.dest, p.goals[0].hand_only) == ("", dest, True), task
    assert parse_task("reach over the wall to the goal position").goals[0].via == "over the wall"
    # where the object is, for verbs that do not carry it there
    assert parse_task("press the button on the coffee machine").where == "on the coffee machine"
    assert parse_task("press the button behind the wall down from above").where == "behind the wall"
    p = parse_task("pick up the black bowl between the plate and the ramekin and place it on the plate")
    assert (p.obj, p.where, p.dest) == ("the black bowl", "between the plate and the ramekin", "on the plate")
    # one goal per object; "it" refers back
    goals = lambda task: [(g.verb, g.obj, g.result, g.dest) for g in parse_task(task).goals]  # noqa: E731
    assert goals("open the top drawer and put the bowl inside") == [
        ("open", "the top drawer", "open", ""), ("put", "the bowl", "inside", "")]
    assert goals("turn on the stove and put the moka pot on it") == [
        ("turn on", "the stove", "on", ""), ("put", "the moka pot", "", "on the stove")]
    assert goals("put the black bowl in the bottom drawer of the cabinet and close it") == [
        ("put", "the black bowl", "", "in the bottom drawer of the cabinet"),
        ("close", "the bottom drawer of the cabinet", "closed", "")]
    assert goals("pick up the stick and use it to push the box to the goal") == [
        ("pick up", "the stick", "", ""), ("push", "the box", "", "to the goal")]
    assert goals("pick up the hammer and hammer the nail into the wall") == [
        ("pick up", "the hammer", "", ""), ("hammer", "the nail", "", "into the wall")]


def test_texts_give_reasons_from_the_goal():
    phases = segment_episode(*motion_episode(EPISODES[0][1]), MotionSpec())
    text = compose_text(EPISODES[0][0], phases, "full")
    assert text.startswith("The goal is to pick up the red block and place it on the plate. First the hand "
                           "moves along +x to the red block (steps 0-7), because it must reach the red block")
    assert "closes on the red block (steps 8-10), so that the red block moves with the hand" in text
    assert ("carries the red block along +y until it is on the plate (steps 11-18), because the red block must "
            "end up on the plate") in text
    assert text.endswith("Finally the gripper opens and lets go of the red block while the hand drifts up "
                         "(steps 19-24), because the red block is on the plate and the goal is reached.")
    press = compose_text(EPISODES[3][0], segment_episode(*motion_episode(EPISODES[3][1]), MotionSpec()), "plain")
    assert "because it must touch the button before it can press it." in press
    assert "moves the button down, because that is how to press the button from the top" in press
    assert "steps" not in press


DEMO_TEXTS = {  # the demo tasks: (task, phases) -> fragments of the full text
    ("reach-v3", "reach"): ["First the hand moves up to the goal position (steps 0-9), because the task is done once "
                            "the hand is there.", "because the hand is at the goal position and more motion"],
    ("push-v3", "contact"): ["First the hand moves along +x to the puck (steps 0-7), because it must touch the puck "
                             "before it can push it.", "Then it stays in contact and moves the puck along +y",
                             "because the puck is at the goal and more motion would undo it"],
    ("drawer-open-v3", "contact"): ["moves along +x to the drawer (steps 0-7), because it must touch the drawer "
                                    "before it can pull it open.", "because the drawer is open and more motion"],
    ("button-press-topdown-v3", "contact_down"): [
        "because it must touch the button before it can press it down.", "moves the button down (steps 7-12)",
        "drifting slightly along +x (steps 13-15), because the button is down"],
    ("drawer-open-v3", "grip"): ["moves the drawer up while holding it (steps 11-18) until the drawer is open, "
                                 "because the goal needs it open."],
}


@pytest.mark.parametrize("key", DEMO_TEXTS, ids=lambda key: "-".join(key))
def test_demo_task_texts(key):
    task, seq = key
    text = compose_text(MW_TASKS[task], PHASE_SEQS[seq], "full")
    for fragment in DEMO_TEXTS[key]:
        assert fragment in text


def check_text(text: str, task: str, phases: list[Phase], style: str) -> None:
    """What every label must be: no garbled fragments, capitalised sentences ending with a period, the object named,
    the phases in order."""
    parts = parse_task(task)
    assert not [f for f in BAD_FRAGMENTS if f in text], text
    assert not DOUBLED.search(text), text
    for sentence in re.split(r"(?<=\.) ", text):
        assert sentence[:1].isupper() and sentence.endswith("."), (sentence, text)
    goal_sentence, _, body = text.partition(". ")
    assert parts.text in goal_sentence
    goal_objects = {g.obj for g in parts.goals if g.obj}
    if style != "minimal":
        assert any(obj in body for obj in goal_objects) if goal_objects else parts.goals[0].target in body, text
    if style in ("full", "plain") and len(phases) > 1:
        openers = re.findall(r"\b(First|Then|Next|Finally) ", body)
        assert openers[0] == "First" and openers[-1] == "Finally" and len(openers) == len(phases), text
        assert set(openers[1:-1]) <= {"Then", "Next"}
    if style == "full":
        ranges = [f"(steps {p.start}-{p.stop - 1})" if p.length > 1 else f"(step {p.start})" for p in phases]
        assert [text.index(r) for r in ranges] == sorted(text.index(r) for r in ranges), text
    if style == "minimal":
        assert ", ".join(f"{p.name} {p.direction}".rstrip() for p in phases).lower() in text.lower()


@pytest.mark.parametrize("task", [*MW_TASKS.values(), *LIBERO_TASKS])
def test_every_task_reads_well_and_phase_sequences_give_distinct_texts(task):
    for style in STYLES:
        texts = {name: compose_text(task, phases, style) for name, phases in PHASE_SEQS.items()}
        for name, text in texts.items():
            check_text(text, task, PHASE_SEQS[name], style)
        assert len(set(texts.values())) == len(texts), f"{style}: some phase sequences share a text"
        assert texts == {name: compose_text(task, phases, style) for name, phases in PHASE_SEQS.items()}


def test_hand_only_tasks_say_where_the_hand_goes():
    for task in ("move the gripper to the goal position", "reach over the wall to the goal position"):
        for phases in PHASE_SEQS.values():
            for style in ("full", "plain", "short"):
                text = compose_text(task, phases, style)
                assert "the goal position" in text.partition(". ")[2] and "toward the gripper" not in text
    text = compose_text("reach over the wall to the goal position", PHASE_SEQS["contact"], "plain")
    assert text == ("The goal is to reach over the wall to the goal position. First the hand moves along +x over the "
                    "wall toward the goal position, because the task is done once the hand is there. Then it turns "
                    "and moves along +y, because the goal position lies that way. Finally the hand slows down and "
                    "stays still, because the hand is at the goal position and more motion would undo it.")


def test_grasp_cycles_follow_the_goals():
    regrasp = PHASE_SEQS["regrasp"]
    text = compose_text("open the top drawer and put the bowl inside", regrasp, "plain")  # one cycle per goal
    assert "closes on the top drawer, so that" in text and "so that the hand is free for the bowl" in text
    assert "moves along -x to the bowl, because it must reach the bowl" in text
    assert text.endswith("because the bowl is inside and the goal is reached.")
    one_cycle = compose_text("open the top drawer and put the bowl inside", PHASE_SEQS["grip"], "plain")
    assert one_cycle.endswith("because the top drawer is open.")  # the bowl is not in yet
    tool = compose_text("pick up the hammer and hammer the nail into the wall", regrasp, "plain")
    assert "closes on the nail" not in tool and "closes on the hammer a second time" in tool
    assert "moves the hammer along +y while holding it, so as to hammer the nail into the wall." in tool
    short = compose_text("put the cube in the bowl", regrasp, "short")
    assert "close the gripper a second time, so the cube moves with the hand" in short


def test_fit_text_uses_the_richest_style_that_fits():
    phases = segment_episode(*motion_episode(EPISODES[1][1]), MotionSpec())
    lengths = [len(compose_text(EPISODES[1][0], phases, s).split()) for s in STYLES]
    assert lengths == sorted(lengths, reverse=True)
    for style, budget in zip(STYLES, lengths, strict=True):
        assert fit_text(EPISODES[1][0], phases, lambda t, b=budget: len(t.split()) <= b)[1] == style
    with pytest.raises(FplusError, match="raise COC_MAX_TOKENS"):
        fit_text(EPISODES[1][0], phases, lambda t: False)


# -- generate ----------------------------------------------------------------------------------------------------


def test_generate_round_trip_full_coverage_and_determinism(tmp_path, motion_ds):
    counter = load_token_counter("tiny")
    job = LabelJob(action_key="action", state_key=STATE, instruction_key="task", spec=MotionSpec(),
                   counter=counter, max_tokens=128)
    result = generate_coc(motion_ds, tmp_path / "coc.jsonl", job, progress=False)
    report = validate_coc(result.path, max_tokens=128, counter=counter, dataset=motion_ds, require_full_coverage=True)
    assert report.ok and not report.warnings and report.coverage.labelled == len(EPISODES)
    assert [[(p.name, p.start, p.stop) for p in label.phases] for label in result.labels] == EXPECTED_PHASES
    assert all(label.tokens <= 128 for label in result.labels)
    records = [json.loads(line) for line in result.path.read_text().splitlines()]
    assert [r["episode_index"] for r in records] == list(range(len(EPISODES)))
    assert all(set(r) == {"episode_index", "coc_text"} for r in records)
    assert "the red block" in records[0]["coc_text"] and "the puck" in records[1]["coc_text"]

    again = generate_coc(motion_ds, tmp_path / "again.jsonl", job, progress=False)
    assert again.path.read_bytes() == result.path.read_bytes()
    with pytest.raises(FplusError, match="already exists; pass --overwrite"):
        generate_coc(motion_ds, result.path, job, progress=False)
    roomy = generate_coc(motion_ds, result.path, replace(job, max_tokens=1000), overwrite=True, progress=False)
    assert set(roomy.styles()) == {"full"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.jsonl", "coc.jsonl"]  # no temporary files left


def test_write_jsonl_atomic_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "x.jsonl"
    write_jsonl_atomic(path, [{"a": 1}], overwrite=False)
    with pytest.raises(TypeError):
        write_jsonl_atomic(path, [{"a": object()}], overwrite=True)
    assert path.read_text() == '{"a": 1}\n' and [p.name for p in tmp_path.iterdir()] == ["x.jsonl"]


def test_generate_keys_come_from_settings(tmp_path, motion_ds):
    out = tmp_path / "coc.jsonl"
    base = {"DATASET": str(motion_ds.root), "BACKBONE": "tiny"}
    with pytest.raises(FplusError, match="ACTION_KEY not set"):
        generate_from_settings(load_settings(None, base, environ={}, dotenv=None), out, spec=MotionSpec())
    wrong = load_settings(None, {**base, "ACTION_KEY": "actions"}, environ={}, dotenv=None)
    with pytest.raises(FplusError, match="ACTION_KEY='actions' is not in the dataset"):
        generate_from_settings(wrong, out, spec=MotionSpec())
    settings = load_settings(None, {**base, "ACTION_KEY": "action", "COC_MAX_TOKENS": "400"}, environ={}, dotenv=None)
    result = generate_from_settings(settings, out, spec=MotionSpec(), progress=False)
    assert result.report.ok and result.labels[0].style == "full"  # no state: motion from the actions
    assert [[(p.name, p.start, p.stop) for p in label.phases] for label in result.labels] == EXPECTED_PHASES
    with pytest.raises(FplusError, match="--gripper-dim 5 is outside"):
        generate_coc(motion_ds, tmp_path / "g.jsonl", LabelJob(action_key="action", state_key=None,
                     instruction_key="task", spec=MotionSpec(gripper_dim=5), counter=WORDS, max_tokens=100),
                     progress=False)


# -- VLM ---------------------------------------------------------------------------------------------------------


def test_vlm_prompt_construction():
    phases = segment_episode(*motion_episode(EPISODES[0][1]), MotionSpec())
    steps = choose_frames(phases, 4)
    assert steps == [3, 9, 14, 21]  # the middle frame of each phase
    assert choose_frames(phases, 2) == [3, 21]
    prompt = build_prompt(EPISODES[0][0], phases, "DRAFT TEXT", steps, 25, max_tokens=60)
    assert "at steps 3, 9, 14, 21 of 25" in prompt
    assert 'Task: "pick up the red block and place it on the plate"' in prompt
    assert "1. approach, steps 0-7, moving along +x\n2. grasp, steps 8-10\n3. move, steps 11-18" in prompt
    assert "Draft: DRAFT TEXT" in prompt and "At most 40 words" in prompt
    messages = build_messages(prompt, 4)
    assert messages[0]["role"] == "user" and [c["type"] for c in messages[0]["content"]] == ["image"] * 4 + ["text"]
    assert expand_image_tokens([1, 9, 2, 9, 3], 9, [2, 3]) == [1, 9, 9, 2, 9, 9, 9, 3]
    with pytest.raises(FplusError, match="rendered 1 image placeholders for 2 images"):
        expand_image_tokens([1, 9, 2], 9, [2, 2])
    assert clean_generation("First it moves.  Then it **grasps** the", finished=False) == "First it moves."
    assert clean_generation("  One sentence without end", finished=True) == "One sentence without end"


def test_vlm_without_weights_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing can be found offline
    with pytest.raises(FplusError, match="cannot load the VLM 'Qwen/Qwen3-VL-2B-Instruct'.*leave out --vlm"):
        VlmLabeler.load("qwen3-vl-2b", device="cpu")
    with pytest.raises(FplusError, match="random model"):
        VlmLabeler.load("tiny", device="cpu")


def test_vlm_labels_through_a_saved_tiny_model(tmp_path, motion_ds):
    """The real loading and generation path, with a tiny random Qwen3-VL saved to a directory; its text is
    gibberish, so the episodes keep the templated text and are reported as rejected."""
    from fplus.model.backbone import load_backbone, save_backbone

    save_backbone(load_backbone("tiny", action_horizon=1, num_fut_tokens=0, use_state=False), tmp_path / "vlm")
    vlm = VlmLabeler.load(str(tmp_path / "vlm"), device="cpu", image_size=32, num_frames=2)
    ds = write_motion_dataset(tmp_path / "ds", EPISODES[:2])
    job = LabelJob(action_key="action", state_key=STATE, instruction_key="task", spec=MotionSpec(), counter=WORDS,
                   max_tokens=40, vlm=vlm, image_key=CAM)
    result = generate_coc(ds, tmp_path / "coc.jsonl", job, progress=False)
    assert result.report.ok and len(result.labels) == 2
    assert all(label.style in ("vlm", *STYLES) for label in result.labels)
    assert sorted(result.vlm_rejected) == [label.episode_index for label in result.labels if label.style != "vlm"]
