"""`fplus serve`: a websocket policy server speaking openpi's protocol, so that openpi's client works unchanged:

    from openpi_client.websocket_client_policy import WebsocketClientPolicy
    client = WebsocketClientPolicy("127.0.0.1", 8000)     # receives the metadata
    actions = client.infer(obs)["actions"]                # (H, A) raw

The protocol (openpi's `src/openpi/serving/websocket_policy_server.py` and the client's
`openpi_client/websocket_client_policy.py`, openpi-client 0.1.2):

    connect       the server sends the metadata: one binary msgpack frame (a map, see PolicyRunner.metadata)
    observation   the client sends one binary frame: a msgpack-numpy map (fplus.deploy.protocol)
    reply         one binary frame: {"actions": float32 (H, A) raw units, "episode_step": int,
                  "server_timing": {"infer_ms", "queue_ms", ["prev_total_ms"]}, "policy_timing": {"infer_ms"}}
    error         one TEXT frame, one line: `error: ...` (openpi's client raises RuntimeError on a text reply)
    GET /healthz  200 OK (openpi's health check)

Unlike openpi's server, which closes the connection after any error, a bad observation (fplus.deploy.observation:
missing key, wrong shape or dtype, non-finite values, undecodable, over SERVE_MAX_MESSAGE_MB) gets its error and
the connection stays open with its episode unchanged, so the client can send the next one. An unexpected failure
of the policy gets `error (internal ...)` and that connection is closed (1011); others are unaffected. A message over
twice SERVE_MAX_MESSAGE_MB is not read at all: websockets closes that connection with 1009 (message too big).

Every connection is one episode (its own world-latent history); `reset: True` in an observation starts a new one.
Connections are served concurrently (asyncio); inference runs in one worker thread, one observation at a time, in
arrival order. SIGINT / SIGTERM close every connection (1001, going away), let the inference in progress finish and
stop the server. It binds to SERVE_HOST (127.0.0.1) unless told otherwise.
"""

from __future__ import annotations

import asyncio
import http
import signal
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import websockets
from websockets.asyncio.server import ServerConnection, serve

from fplus.deploy.observation import Observation, ObservationError, parse_observation
from fplus.deploy.protocol import packb, unpackb
from fplus.deploy.runner import PolicyRunner
from fplus.errors import FplusError

MB = 1_000_000


class PolicyServer:
    """Serves one PolicyRunner over websockets (`run` inside an event loop; `serve_until_signal` blocks).

    Args:
        runner: the policy (fplus.deploy.runner.load_runner).
        host, port: where to listen (port 0: any free port; `ready` is told which).
        max_message_mb: largest observation accepted (SERVE_MAX_MESSAGE_MB).
        log: called with one line per event (connection opened/closed, an error sent); None: silent.
    """

    def __init__(self, runner: PolicyRunner, host: str = "127.0.0.1", port: int = 8000,
                 max_message_mb: float = 16.0, log: Callable[[str], None] | None = None):
        self.runner, self.host, self.port = runner, host, port
        self.max_bytes = int(max_message_mb * MB)
        self.log = log or (lambda line: None)
        self.metadata = {**runner.metadata(), "max_message_mb": max_message_mb}
        self._executor: ThreadPoolExecutor | None = None
        self.connections = 0  # opened so far

    async def run(self, stop: asyncio.Event, ready: Callable[[str, int], None] | None = None) -> None:
        """Serve until `stop` is set, then close every connection and wait for their handlers."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fplus-infer")
        try:
            async with serve(self._handler, self.host, self.port, compression=None, max_size=2 * self.max_bytes,
                             process_request=_health_check) as server:
                port = next(iter(server.sockets)).getsockname()[1]
                if ready is not None:
                    ready(self.host, port)
                await stop.wait()
        finally:
            self._executor.shutdown(wait=True)

    async def _handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        peer = _peer(ws)
        episode = self.runner.new_episode()
        self.log(f"{peer}: connected")
        try:
            await ws.send(packb(self.metadata))
            prev_total_ms = None
            while True:
                message = await ws.recv()
                start = time.monotonic()
                try:
                    obs = self._decode(message)
                    reply, queue_ms, infer_ms = await self._infer(episode, obs)
                except FplusError as err:  # the client's mistake: say so, keep the connection and its episode
                    line = f"error: {_one_line(err)}"
                    self.log(f"{peer}: {line}")
                    await ws.send(line)
                    prev_total_ms = None
                    continue
                except Exception as err:  # noqa: BLE001 -- reported to the client, then this connection ends
                    self.log(f"{peer}: internal error, closing the connection:\n{traceback.format_exc()}")
                    await ws.send(f"error (internal, {type(err).__name__}): {_one_line(err)}; the server closes "
                                  "this connection: reconnect to start a new episode")
                    await ws.close(1011, "internal server error; the error is in the previous frame")
                    return
                reply["server_timing"] = {"infer_ms": infer_ms, "queue_ms": queue_ms}
                if prev_total_ms is not None:  # openpi: the previous request, send time included
                    reply["server_timing"]["prev_total_ms"] = prev_total_ms
                await ws.send(packb(reply))
                prev_total_ms = (time.monotonic() - start) * 1e3
        except websockets.ConnectionClosed:
            pass
        finally:
            self.log(f"{peer}: disconnected")

    def _decode(self, message: bytes | str) -> Observation:
        if isinstance(message, str):
            raise ObservationError("expected a binary frame holding a msgpack-numpy map (openpi's protocol), got "
                                   "a text frame")
        if len(message) > self.max_bytes:
            raise ObservationError(f"the message has {len(message) / MB:.1f} MB; this server accepts at most "
                                   f"{self.max_bytes / MB:g} MB (SERVE_MAX_MESSAGE_MB)")
        try:
            msg = unpackb(message)
        except Exception as err:  # noqa: BLE001 -- msgpack and numpy raise many kinds for a malformed message
            raise ObservationError(f"cannot decode the message as msgpack-numpy (openpi's protocol): "
                                   f"{type(err).__name__}: {_one_line(err)}") from None
        return parse_observation(msg, self.runner.spec, self.runner.supports_prefix)

    async def _infer(self, episode, obs: Observation) -> tuple[dict[str, Any], float, float]:
        """The runner's reply in the inference thread; (reply, ms waiting for the thread, ms of inference)."""
        submitted = time.perf_counter()
        timing: dict[str, float] = {}

        def job():
            timing["start"] = time.perf_counter()
            try:
                return self.runner.infer(episode, obs)
            finally:
                timing["end"] = time.perf_counter()

        reply = await asyncio.get_running_loop().run_in_executor(self._executor, job)
        return reply, (timing["start"] - submitted) * 1e3, (timing["end"] - timing["start"]) * 1e3

    def serve_until_signal(self, ready: Callable[[str, int], None] | None = None) -> str:
        """Serve in this (main) thread until SIGINT or SIGTERM; returns the signal's name after a clean stop."""
        received: list[str] = []

        async def main() -> None:
            loop, stop = asyncio.get_running_loop(), asyncio.Event()
            signals = (signal.SIGINT, signal.SIGTERM)
            for sig in signals:
                loop.add_signal_handler(sig, lambda s=sig: (received.append(s.name), stop.set()))
            try:
                await self.run(stop, ready)
            finally:
                for sig in signals:
                    loop.remove_signal_handler(sig)

        asyncio.run(main())
        return received[0] if received else "stop"


class ServerThread:
    """A PolicyServer in a background thread with its own event loop (tests, benchmarks):

        with ServerThread(server) as (host, port):
            ...                                   # connect to ws://host:port
    """

    def __init__(self, server: PolicyServer, timeout: float = 60.0):
        self.server, self.timeout = server, timeout
        self._ready = threading.Event()
        self._address: tuple[str, int] | None = None
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="fplus-serve", daemon=True)

    def _main(self) -> None:
        async def main() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            await self.server.run(self._stop, self._on_ready)

        try:
            asyncio.run(main())
        except BaseException as err:  # noqa: BLE001 -- handed to the thread that waits in __enter__
            self._error = err
            self._ready.set()

    def _on_ready(self, host: str, port: int) -> None:
        self._address = (host, port)
        self._ready.set()

    def __enter__(self) -> tuple[str, int]:
        self._thread.start()
        if not self._ready.wait(self.timeout):
            raise TimeoutError(f"the policy server did not start within {self.timeout} s")
        if self._error is not None:
            raise self._error
        return self._address

    def __exit__(self, *exc) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(self.timeout)


def _health_check(connection: ServerConnection, request) -> Any:
    """openpi's: GET /healthz answers 200 OK; any other path goes on to the websocket handshake."""
    if request.path == "/healthz":
        return connection.respond(http.HTTPStatus.OK, "OK\n")
    return None


def _peer(ws: ServerConnection) -> str:
    address = ws.remote_address
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) and len(address) >= 2 else str(address)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
