"""The chunk scheduler (DESIGN 11): when the policy is asked for an action chunk, which action of which chunk the
robot executes at each control step, and what a request carries, for an inference delay d, an execution horizon s
and a strategy. One scheduler for the simulator loop (`fplus.eval.closed_loop`: the delay is simulated in control
steps, so results do not depend on the machine's speed) and for real robots (the delay is what it is). It knows
nothing of simulators or models: chunks are (H, A) arrays of raw actions.

Time is counted in control steps: step t is the t-th control tick of the episode. A chunk requested at step r from
the observation o_r holds H actions, its action j meant for step r + j. One rule picks every action:

    at step t the robot executes action t - r of the newest chunk that has arrived (requested at step r)

and the next chunk is requested when the current one has run s steps since its request (t - r = s).

    sync   the robot stands still while a chunk is inferred; no control step passes, so a chunk runs its actions
           0 .. s-1. In a simulator the env is not stepped during inference: no latency cost in simulated time.
           What it would cost a robot is counted: `idle_steps` grows by d per request.
    naive  the next chunk is requested while the current one executes; it arrives d steps later (step r + d) and
           the robot switches to it at once, without inpainting: its actions d .. s+d-1 (the first d were meant
           for steps that have passed while it was inferred). The switch can jump.
    rtc    real-time chunking (Black, Galliker, Levine 2025): the timing of naive, and the request carries the
           current chunk's plan for the overlap as a prefix aligned with the new chunk's index 0 (prefix[i] is
           meant for step r + i): its first d actions run during inference, so the policy must reproduce them
           (frozen); the rest (P = H - s actions in all) is soft guidance (RTC's decaying mask over the overlap).
           The policy inpaints it: a flow head by guided denoising, an MSE head by a prefix blend. With d = 0
           nothing runs during inference and no prefix is sent: rtc is then plain inference (= sync = naive).

The first chunk of an episode is always waited for (there is nothing to execute before it): it arrives at step 0
for every strategy, without a prefix, and the wait counts d idle steps.

Example, H = 8, s = 4, d = 2, naive or rtc (sync: chunk k runs steps 4k .. 4k+3 at indices 0 .. 3):

    step    0  1  2  3  4  5  6  7  8  9 10 11 12 13
    chunk   0  0  0  0  0  0  1  1  1  1  2  2  2  2      chunk 1 requested at step 4 (o_4), arrives at 6
    index   0  1  2  3  4  5  2  3  4  5  2  3  4  5      chunk 2 requested at step 8 (o_8), arrives at 10

    rtc: the request at step 4 carries chunk 0's actions 4..7; 4 and 5 are frozen (they run at steps 4, 5, while
    chunk 1 is inferred), so chunk 1's actions 0, 1 reproduce what was executed and it takes over at index 2.

Constraints (`check_timing`): 1 <= s <= H and d >= 0; naive and rtc also need d <= s (one inference at a time:
the next request, s steps after this one, comes after this chunk has arrived) and d <= H - s (the RTC paper's: the
current chunk must last until the next one arrives, at its index s + d - 1).

Interfaces:
    ChunkScheduler          the state machine: `needs_request()`, `request()`, `submit(chunk)` when the chunk arrives,
                            `next_action()` once per control tick. A robot calls submit when its inference returns.
    SimulatedInference      the scheduler driven by `policy_fn(obs, prefix, delay) -> (H, A)`, each chunk delivered
                            at `Request.arrives` (d steps after its request for naive and rtc): `act(obs)` per step.
    Smoothness              mean |a_t - a_{t-1}| at chunk boundaries and within chunks (see its docstring).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from fplus.errors import ConfigError

STRATEGIES = ("sync", "naive", "rtc")
"""Chunking strategies: the robot waits (sync), switches to the late chunk (naive), inpaints it (rtc)."""


def check_strategy(strategy: str) -> str:
    """`strategy` if it is one of STRATEGIES, else a ConfigError naming them (with a "did you mean")."""
    if strategy not in STRATEGIES:
        close = difflib.get_close_matches(strategy, STRATEGIES, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"unknown chunking strategy {strategy!r}{hint}; valid: {', '.join(STRATEGIES)}")
    return strategy


def check_timing(strategy: str, horizon: int, execution_horizon: int, inference_delay: int) -> None:
    """Raise a ConfigError unless the strategy can run chunks of H = `horizon` actions, s = `execution_horizon` per
    chunk, with an inference delay of d = `inference_delay` control steps (the constraints of the module doc)."""
    check_strategy(strategy)
    h, s, d = horizon, execution_horizon, inference_delay
    if h < 1:
        raise ConfigError(f"chunks must hold at least 1 action, not H={h}")
    if not 1 <= s <= h:
        raise ConfigError(f"execution horizon s={s} (actions executed per chunk, --n-action-steps) must be between 1 "
                          f"and the chunk length H={h}")
    if d < 0:
        raise ConfigError(f"inference delay d={d} must be 0 or more control steps")
    if strategy == "sync":
        return
    if d > s:
        raise ConfigError(f"{strategy} chunking: inference delay d={d} is longer than the execution horizon s={s}: "
                          f"the next chunk would be requested before this one arrives; use d <= s (raise "
                          f"--n-action-steps or lower --inference-delay)")
    if s + d > h:
        raise ConfigError(f"{strategy} chunking: the current chunk must last until the next arrives, at its action "
                          f"s + d = {s + d}, but chunks hold H={h} actions (RTC's d <= H - s: use d <= {h - s}, or "
                          f"fewer --n-action-steps)")


def parse_list(text: str, what: str, cast: Callable[[str], object]) -> tuple:
    """"0,2, 4" -> (0, 2, 4) with `cast` on each item (duplicates dropped, order kept); a ConfigError naming `what`
    when an item does not cast or the list is empty."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ConfigError(f"{what}: give at least one value (a comma-separated list), not {text!r}")
    out = []
    for item in items:
        try:
            out.append(cast(item))
        except ValueError:
            raise ConfigError(f"{what}: {item!r} is not valid (a comma-separated list, e.g. 0,2,4)") from None
    return tuple(dict.fromkeys(out))


def parse_delays(text: str) -> tuple[int, ...]:
    """--inference-delay "0,2,4" -> (0, 2, 4)."""
    return parse_list(text, "--inference-delay", int)


def parse_strategies(text: str) -> tuple[str, ...]:
    """--chunking "sync,rtc" -> ("sync", "rtc"), each checked."""
    return parse_list(text, "--chunking", check_strategy)


@dataclass
class Smoothness:
    """How much the executed actions jump, in raw action units.

    For consecutive executed actions a_{t-1}, a_t of an episode, the change is mean_i |a_t[i] - a_{t-1}[i]| (the
    mean over action dimensions of the absolute difference). A transition is at a chunk boundary when a_t comes from
    another chunk than a_{t-1} (the step where the robot switches), else within a chunk. `boundary` and `within`
    are the means of the change over each kind of transition (None when there is none: with s = 1 every transition
    is a boundary); pooled over episodes by adding the sums. A discontinuity at the switch shows as boundary >>
    within; a strategy that switches smoothly has boundary close to within.
    """

    boundary_sum: float = 0.0
    boundary_transitions: int = 0
    within_sum: float = 0.0
    within_transitions: int = 0

    def add(self, previous: np.ndarray, current: np.ndarray, boundary: bool) -> None:
        change = float(np.mean(np.abs(np.asarray(current, np.float64) - np.asarray(previous, np.float64))))
        if boundary:
            self.boundary_sum += change
            self.boundary_transitions += 1
        else:
            self.within_sum += change
            self.within_transitions += 1

    def __add__(self, other: Smoothness) -> Smoothness:
        return Smoothness(self.boundary_sum + other.boundary_sum,
                          self.boundary_transitions + other.boundary_transitions,
                          self.within_sum + other.within_sum, self.within_transitions + other.within_transitions)

    @property
    def boundary(self) -> float | None:
        return self.boundary_sum / self.boundary_transitions if self.boundary_transitions else None

    @property
    def within(self) -> float | None:
        return self.within_sum / self.within_transitions if self.within_transitions else None

    def to_json(self) -> dict:
        """{boundary, within, boundary_transitions, within_transitions}."""
        return {"boundary": self.boundary, "within": self.within, "boundary_transitions": self.boundary_transitions,
                "within_transitions": self.within_transitions}

    @classmethod
    def from_json(cls, data: dict) -> Smoothness:
        """The inverse of `to_json` (the sums from mean x count)."""
        nb, nw = int(data["boundary_transitions"]), int(data["within_transitions"])
        return cls((data["boundary"] or 0.0) * nb, nb, (data["within"] or 0.0) * nw, nw)


@dataclass(frozen=True)
class Request:
    """A request for the next chunk, to be computed from the observation of control step `step`.

    prefix: rtc only (else None): (P, A) raw actions, P = H - s, the current chunk's actions for steps step ..
        step + P - 1 (prefix[i] is meant for the new chunk's index i); the first `delay` run during inference.
    delay: how many leading prefix actions are frozen (d for rtc, 0 without a prefix).
    arrives: the control step at which a simulated inference delivers the chunk: step + d for naive and rtc,
        `step` for sync and the first chunk (the robot waits).
    idle: control steps the robot stands still waiting for it (d for sync and the first chunk, else 0).
    """

    step: int
    chunk: int
    prefix: np.ndarray | None
    delay: int
    arrives: int
    idle: int


@dataclass
class ChunkScheduler:
    """The chunk scheduler of one episode (a new one per episode). See the module doc for the timing.

    Per control tick: if `needs_request()`, call `request()` and start the inference from the current observation;
    when the chunk is there, `submit(chunk)` (before `next_action` of the tick it arrives in); then `next_action()`
    gives the action to execute, or None when there is none (waiting for the first chunk or, in sync, for any:
    the clock stands still; a late chunk in naive/rtc that outlasted the current one: the robot holds and the
    clock runs on). `horizon` (H) may be left None: it is taken from the first chunk and checked then.
    """

    execution_horizon: int
    inference_delay: int = 0
    strategy: str = "sync"
    horizon: int | None = None
    step: int = 0
    """Control steps so far (the index of the next tick)."""
    idle_steps: int = 0
    """Ticks without an action (`next_action` returned None) plus the simulated waits (`SimulatedInference`)."""
    timeline: list[tuple[int, int]] = field(default_factory=list)
    """(chunk, index within it) of every executed action, in order."""
    smoothness: Smoothness = field(default_factory=Smoothness)
    requests: list[Request] = field(default_factory=list)
    _chunk: np.ndarray | None = None
    _chunk_id: int = -1
    _chunk_step: int = 0  # the step the current chunk was requested at
    _pending: Request | None = None
    _last: np.ndarray | None = None
    _last_id: int = -1

    def __post_init__(self):
        check_strategy(self.strategy)
        if self.horizon is not None:
            check_timing(self.strategy, self.horizon, self.execution_horizon, self.inference_delay)

    @property
    def pending(self) -> Request | None:
        """The request whose chunk has not arrived yet."""
        return self._pending

    def needs_request(self) -> bool:
        """Whether a chunk must be requested at this step: none requested yet, or the current one has run s steps
        since its request (and no request is pending)."""
        if self._pending is not None:
            return False
        return self._chunk is None or self.step - self._chunk_step >= self.execution_horizon

    def request(self) -> Request:
        """Request the next chunk from this step's observation (see `Request`)."""
        if not self.needs_request():
            raise RuntimeError("ChunkScheduler.request: no chunk is due at this step (see needs_request)")
        first = self._chunk is None
        d = self.inference_delay
        waits = first or self.strategy == "sync"
        prefix, delay = None, 0
        if self.strategy == "rtc" and not first and d > 0:  # d = 0: nothing runs during inference, plain inference
            prefix = self._chunk[self.step - self._chunk_step:].copy()
            delay = d
            if len(prefix) == 0:  # s = H: nothing overlaps
                prefix = None
        req = Request(step=self.step, chunk=len(self.requests), prefix=prefix, delay=delay,
                      arrives=self.step if waits else self.step + d, idle=d if waits else 0)
        self._pending = req
        self.requests.append(req)
        return req

    def submit(self, chunk: np.ndarray) -> None:
        """The chunk (H, A) of the pending request arrives now (at this step): the robot switches to it at once,
        at its action `step - request.step`."""
        if self._pending is None:
            raise RuntimeError("ChunkScheduler.submit: no chunk was requested (see request)")
        chunk = np.asarray(chunk)
        if chunk.ndim != 2:
            raise ConfigError(f"the policy returned a chunk of shape {tuple(chunk.shape)}; expected (H, A)")
        if self.horizon is None:
            check_timing(self.strategy, len(chunk), self.execution_horizon, self.inference_delay)
            self.horizon = len(chunk)
        elif len(chunk) != self.horizon:
            raise ConfigError(f"the policy returned a chunk of {len(chunk)} actions; this scheduler runs chunks of "
                              f"H={self.horizon}")
        self._chunk, self._chunk_id, self._chunk_step = chunk, self._pending.chunk, self._pending.step
        self._pending = None

    def next_action(self) -> np.ndarray | None:
        """The action of this control tick (the step advances), or None when there is none (see the class doc)."""
        waiting = self._chunk is None or (self.strategy == "sync" and self._pending is not None)
        index = self.step - self._chunk_step
        if waiting or index >= len(self._chunk):
            self.idle_steps += 1
            if not waiting:  # a late chunk: the robot holds, time runs on
                self.step += 1
            return None
        action = self._chunk[index]
        if self._last is not None:
            self.smoothness.add(self._last, action, boundary=self._chunk_id != self._last_id)
        self._last, self._last_id = action, self._chunk_id
        self.timeline.append((self._chunk_id, index))
        self.step += 1
        return action


PolicyFn = Callable[[object, "np.ndarray | None", int], np.ndarray]
"""policy_fn(obs, prefix, delay) -> chunk (H, A) raw actions; prefix (P, A) or None, its first `delay` frozen."""


class SimulatedInference:
    """A ChunkScheduler driven by a policy function with the inference delay simulated in control steps: the chunk
    requested at step t is computed from o_t at once and delivered at step `Request.arrives` (t + d for naive and
    rtc: meanwhile the current chunk's actions continue; t for sync and the first chunk, whose d steps of waiting
    are added to `idle_steps` without a control step passing). Results do not depend on the machine's speed.

        runner = SimulatedInference(policy_fn, execution_horizon=4, inference_delay=2, strategy="rtc")
        while not done:
            obs, done = env.step(runner.act(obs))
    """

    def __init__(self, policy_fn: PolicyFn, execution_horizon: int, inference_delay: int = 0,
                 strategy: str = "sync", horizon: int | None = None):
        self.policy_fn = policy_fn
        self.scheduler = ChunkScheduler(execution_horizon, inference_delay, strategy, horizon)
        self._in_flight: np.ndarray | None = None

    def act(self, obs) -> np.ndarray:
        """The action of this control step, requesting (and, when due, delivering) chunks as the strategy says."""
        s = self.scheduler
        if s.pending is not None and s.step >= s.pending.arrives:
            s.submit(self._in_flight)
            self._in_flight = None
        if s.needs_request():
            req = s.request()
            self._in_flight = np.asarray(self.policy_fn(obs, req.prefix, req.delay))
            s.idle_steps += req.idle
            if req.arrives <= s.step:
                s.submit(self._in_flight)
                self._in_flight = None
        action = s.next_action()
        if action is None:  # cannot happen within check_timing's constraints
            raise RuntimeError(f"no action at step {s.step - 1}: the chunk in flight arrives too late")
        return action


def timeline(strategy: str, horizon: int, execution_horizon: int, inference_delay: int,
             steps: int) -> list[tuple[int, int]]:
    """(chunk, index) executed at each of the first `steps` control steps (the module doc's table): for docs and
    checks, with chunks that are never looked at."""
    runner = SimulatedInference(lambda obs, prefix, delay: np.zeros((horizon, 1)), execution_horizon,
                                inference_delay, strategy, horizon)
    for _ in range(steps):
        runner.act(None)
    return runner.scheduler.timeline


def settings_grid(strategies: Iterable[str], delays: Iterable[int]) -> list[tuple[str, int]]:
    """Every (strategy, delay) pair, strategies in STRATEGIES order, delays ascending."""
    chosen = {check_strategy(s) for s in strategies}
    return [(s, d) for s in STRATEGIES if s in chosen for d in sorted(set(delays))]


def supports_inpainting(policy) -> bool:
    """Whether `policy.predict` takes an action prefix to inpaint (its `prefix` argument): what rtc chunking and a
    served observation carrying `action_prefix` need."""
    return "prefix" in inspect.signature(policy.predict).parameters
