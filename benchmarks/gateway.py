"""The daemon's Jupyter Kernel Gateway API against the stock Jupyter Kernel Gateway.

What a Jupyter client (JupyterLab through ``--gateway-url``, Open WebUI) waits
for, measured over HTTP and the kernel WebSocket on loopback, every server
running in the same run:

- **start**: ``POST /api/kernels`` → WebSocket to ``/api/kernels/{id}/channels``
  → ``execute_request("pass")`` → its ``execute_reply``, timed from before the
  POST to the reply. Each kernel is deleted afterwards (untimed).

  - *sandkernel*: the daemon with a warm pool of 2; between samples the pool
    is let refill (untimed), as a server between requests would;
  - *Kernel Gateway*: no prespawn, each POST starts a kernel;
  - *Kernel Gateway, prespawn N*: ``--KernelGatewayApp.prespawn_count=N``, one
    kernel per sample. Kernel Gateway starts those kernels once and never
    refills them, and ``POST /api/kernels`` never hands them out (its
    ``jupyter_websocket`` personality only starts them: kernel_gateway
    ``services/kernels/pool.py``, ``KernelPool.initialize``). Two figures: its
    ``POST`` (which starts a kernel anyway), and the best a client can do
    with the prespawned kernels: ``GET /api/kernels``, take one not used yet,
    connect and execute, timed from before the GET;
  - *Kernel Gateway with TCP_NODELAY*, prespawned likewise: Kernel Gateway
    never turns Nagle's algorithm off on its WebSockets, so a small frame
    after another waits for the client's delayed ACK (~40 ms); a config file
    patches that in, for a baseline without the stall.

- **round trip**: ``execute_request("pass")`` → ``execute_reply`` on a held
  WebSocket to a warmed-up kernel, in blocks rotating between the daemon,
  Kernel Gateway (no prespawn), Kernel Gateway with TCP_NODELAY and, as the
  floor, a plain ipykernel driven by jupyter_client over ZeroMQ (no gateway).
  Its ``idle`` status, which may come before or after the reply, is read
  (untimed if after) before the next request.

Clients authenticate as Jupyter Server does (``Authorization: token T``). The
daemon's kernels are sandboxed (default policy); Kernel Gateway's are plain
ipykernels of this virtual environment, with their default settings.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import ClientConnection, connect

from benchmarks._servers import progress
from benchmarks._stats import machine_info, median, ns_to_ms, ratio, summary

POOL_SIZE = 2
SANDKERNEL_SPEC = "sandkernel-default"
KERNEL_GATEWAY_SPEC = "python3"
CODE = "pass"
#: Bound on anything one sample waits for (a kernel start, a reply, a refill).
TIMEOUT_S = 120.0
START_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Plan:
    """How many times each measurement is repeated."""

    start_warmup: int
    starts: int
    execute_warmup: int
    executes: int
    #: round trips per block; blocks of the two servers alternate
    block: int


FULL = Plan(start_warmup=2, starts=20, execute_warmup=50, executes=500, block=50)
QUICK = Plan(start_warmup=1, starts=3, execute_warmup=10, executes=50, block=10)


# ---------------------------------------------------------------------------
# the servers


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Server:
    """A Kernel Gateway-compatible server run as a process of its own."""

    name: str
    url: str
    token: str
    kernel_name: str
    process: subprocess.Popen[bytes]
    log: Path
    http: httpx.Client

    @property
    def ws_base(self) -> str:
        return self.url.replace("http", "ws", 1)

    def fail(self, message: str) -> RuntimeError:
        tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])
        return RuntimeError(f"{self.name}: {message}\n--- its log ({self.log}) ---\n{tail}")

    def channels(self, kernel_id: str) -> ClientConnection:
        return connect(
            f"{self.ws_base}/api/kernels/{kernel_id}/channels?session_id={uuid.uuid4().hex}",
            additional_headers={"Authorization": f"token {self.token}"},
            max_size=None,
            open_timeout=TIMEOUT_S,
        )

    def new_kernel(self) -> str:
        response = self.http.post("/api/kernels", json={"name": self.kernel_name})
        if response.status_code != 201:
            raise self.fail(f"POST /api/kernels: {response.status_code} {response.text[:300]}")
        return str(response.json()["id"])

    def delete_kernel(self, kernel_id: str) -> None:
        response = self.http.delete(f"/api/kernels/{kernel_id}")
        if response.status_code != 204:
            raise self.fail(f"DELETE kernel: {response.status_code} {response.text[:300]}")


def _wait_http(server: Server, path: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        if server.process.poll() is not None:
            raise server.fail(f"exited with {server.process.returncode} before answering")
        try:
            response = server.http.get(path)
        except httpx.TransportError as exc:
            last = repr(exc)
        else:
            if response.status_code == 200:
                return
            last = f"{response.status_code} {response.text[:200]}"
        if time.monotonic() > deadline:
            raise server.fail(f"GET {path} not 200 after {timeout_s:.0f} s (last: {last})")
        time.sleep(0.1)  # polling a process that gives no other signal, bounded above


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, a minute to shut its kernels down, then SIGKILL of its process group."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@contextlib.contextmanager
def _server(
    name: str, argv: list[str], folder: Path, token: str, port: int, kernel_name: str,
    env: dict[str, str] | None = None, ready_path: str = "/api",
    ready_timeout_s: float = START_TIMEOUT_S,
) -> Iterator[Server]:  # fmt: skip
    log = folder / f"{name.replace(' ', '-')}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    http = httpx.Client(
        base_url=f"http://127.0.0.1:{port}",
        headers={"Authorization": f"token {token}"},
        timeout=TIMEOUT_S,
    )
    server = Server(name, f"http://127.0.0.1:{port}", token, kernel_name, process, log, http)
    try:
        _wait_http(server, ready_path, ready_timeout_s)
        yield server
    finally:
        http.close()
        _stop(process)


@contextlib.contextmanager
def _sandkernel(folder: Path) -> Iterator[Server]:
    token = secrets.token_urlsafe(24)
    token_file = folder / "sandkernel-token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    port = _free_port()
    runtime = Path(tempfile.mkdtemp(prefix="sk-bench-gateway-", dir="/run"))
    argv = [
        sys.executable, "-m", "sandkernel.daemon", "serve",
        "--socket", str(folder / "daemon.sock"), "--tcp", f"127.0.0.1:{port}",
        "--token-file", str(token_file), "--store", str(folder / "store"),
        "--runtime-dir", str(runtime), "--pool-size", str(POOL_SIZE), "--prewarm", "",
        "--log-level", "warning",
    ]  # fmt: skip
    try:
        with _server("sandkernel daemon", argv, folder, token, port, SANDKERNEL_SPEC) as server:
            _wait_pool_full(server)
            yield server
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


#: A Kernel Gateway config file that turns Nagle's algorithm off on its WebSockets.
#: Neither Kernel Gateway nor jupyter_server calls tornado's ``set_nodelay(True)``,
#: so a reply frame written right after another small one waits for the
#: client's delayed ACK (about 40 ms on Linux loopback). The patched baseline
#: shows what Kernel Gateway costs without that stall.
_NODELAY_CONFIG = """\
import tornado.websocket

_write_message = tornado.websocket.WebSocketHandler.write_message


def _write_message_nodelay(self, *args, **kwargs):
    if self.ws_connection is not None:
        self.ws_connection.set_nodelay(True)
    return _write_message(self, *args, **kwargs)


tornado.websocket.WebSocketHandler.write_message = _write_message_nodelay
"""


@contextlib.contextmanager
def _kernel_gateway(
    folder: Path, name: str, prespawn: int = 0, *, nodelay: bool = False
) -> Iterator[Server]:
    token = secrets.token_urlsafe(24)
    port = _free_port()
    home = folder / name.replace(" ", "-")
    if nodelay:
        (home / "config").mkdir(parents=True)
        (home / "config" / "jupyter_kernel_gateway_config.py").write_text(_NODELAY_CONFIG)
    env = {
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_DATA_DIR": str(home / "data"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTER_PLATFORM_DIRS": "1",
    }
    argv = [
        str(Path(sys.executable).with_name("jupyter")), "kernelgateway",
        "--KernelGatewayApp.ip=127.0.0.1", f"--KernelGatewayApp.port={port}",
        f"--KernelGatewayApp.auth_token={token}",
        "--JupyterWebsocketPersonality.list_kernels=True",
    ]  # fmt: skip
    if prespawn:
        argv.append(f"--KernelGatewayApp.prespawn_count={prespawn}")
    # Kernel Gateway listens once its prespawned kernels have started.
    with _server(
        name, argv, folder, token, port, KERNEL_GATEWAY_SPEC, env,
        ready_timeout_s=START_TIMEOUT_S + 5 * prespawn,
    ) as server:  # fmt: skip
        yield server


def _wait_pool_full(server: Server) -> None:
    """Until the daemon's pool is back to its warm target (untimed between samples)."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        response = server.http.get("/v1/stats", headers={"Authorization": f"Bearer {server.token}"})
        if response.status_code != 200:
            raise server.fail(f"GET /v1/stats: {response.status_code} {response.text[:200]}")
        pool = response.json()["pool"]
        if pool["warm"] >= pool["target_warm"]:
            return
        if time.monotonic() > deadline:
            raise server.fail(f"pool not refilled after {TIMEOUT_S:.0f} s: {pool}")
        time.sleep(0.02)  # polling the daemon's figures, bounded above


def _pool_stats(server: Server) -> dict[str, Any]:
    response = server.http.get("/v1/stats", headers={"Authorization": f"Bearer {server.token}"})
    return dict(response.json()["pool"])


# ---------------------------------------------------------------------------
# the Jupyter messages


def _execute_request(session: str) -> tuple[str, str]:
    msg_id = uuid.uuid4().hex
    message = {
        "header": {
            "msg_id": msg_id,
            "msg_type": "execute_request",
            "username": "bench",
            "session": session,
            "date": "",
            "version": "5.3",
        },
        "parent_header": {},
        "metadata": {},
        "content": {
            "code": CODE,
            "silent": False,
            "store_history": False,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        },
        "channel": "shell",
        "buffers": [],
    }
    return msg_id, json.dumps(message)


def _read_until_reply(ws: ClientConnection, msg_id: str, *, idle_too: bool) -> int:
    """Read ``msg_id``'s messages until its ``execute_reply``: the ``perf_counter_ns`` then.

    With ``idle_too``, also until its ``idle`` status, which comes on another
    channel and may come before or after the reply.
    """
    deadline = time.monotonic() + TIMEOUT_S
    replied_at: int | None = None
    idle = not idle_too
    while replied_at is None or not idle:
        message = json.loads(ws.recv(timeout=max(deadline - time.monotonic(), 0.001)))
        if message.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        msg_type = message.get("msg_type") or message["header"]["msg_type"]
        if msg_type == "execute_reply":
            replied_at = time.perf_counter_ns()
            if message["content"]["status"] != "ok":
                raise RuntimeError(f"execute failed: {message['content']}")
        elif msg_type == "status" and message["content"]["execution_state"] == "idle":
            idle = True
    return replied_at


def _execute(ws: ClientConnection, session: str) -> int:
    """One ``execute("pass")``: nanoseconds to its reply; its ``idle`` is read too."""
    msg_id, raw = _execute_request(session)
    started = time.perf_counter_ns()
    ws.send(raw)
    return _read_until_reply(ws, msg_id, idle_too=True) - started


# ---------------------------------------------------------------------------
# the measurements


#: One start: its phases in ns (the request, the WebSocket's opening, the first
#: reply), in order; their sum is the start.
Phases = dict[str, int]


def _connect_and_execute(server: Server, kernel_id: str, phases: Phases, mark: int) -> None:
    with server.channels(kernel_id) as ws:
        connected = time.perf_counter_ns()
        phases["connect"] = connected - mark
        msg_id, raw = _execute_request(uuid.uuid4().hex)
        ws.send(raw)
        phases["first_reply"] = _read_until_reply(ws, msg_id, idle_too=False) - connected


def _start_by_post(server: Server) -> Phases:
    """POST a kernel, connect, execute: from before the POST to the first reply."""
    phases: Phases = {}
    started = time.perf_counter_ns()
    kernel_id = server.new_kernel()
    posted = time.perf_counter_ns()
    phases["request"] = posted - started
    _connect_and_execute(server, kernel_id, phases, posted)
    server.delete_kernel(kernel_id)
    if server.kernel_name == SANDKERNEL_SPEC:
        _wait_pool_full(server)
    return phases


def _start_prespawned(server: Server, used: set[str]) -> Phases:
    """Take a prespawned kernel nobody used, connect, execute: from before the GET."""
    phases: Phases = {}
    started = time.perf_counter_ns()
    response = server.http.get("/api/kernels")
    kernel_id = next((k["id"] for k in response.json() if k["id"] not in used), None)
    if kernel_id is None:
        raise server.fail("no prespawned kernel left")
    listed = time.perf_counter_ns()
    phases["request"] = listed - started
    used.add(kernel_id)
    _connect_and_execute(server, kernel_id, phases, listed)
    server.delete_kernel(kernel_id)
    return phases


def _starts(
    plan: Plan, sandkernel: Server, kg: Server, kg_prespawn: Server, kg_nodelay: Server
) -> dict[str, list[Phases]]:
    used: set[str] = set()
    variants: dict[str, Callable[[], Phases]] = {
        "sandkernel": lambda: _start_by_post(sandkernel),
        "kernel_gateway": lambda: _start_by_post(kg),
        "kernel_gateway_prespawn_post": lambda: _start_by_post(kg_prespawn),
        "kernel_gateway_prespawned": lambda: _start_prespawned(kg_prespawn, used),
        "kernel_gateway_nodelay_prespawned": lambda: _start_prespawned(kg_nodelay, used),
    }
    names = list(variants)
    samples: dict[str, list[Phases]] = {name: [] for name in names}
    for round_ in range(plan.start_warmup + plan.starts):
        # The order rotates every round so that no variant always follows another.
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            phases = variants[name]()
            if round_ >= plan.start_warmup:
                samples[name].append(phases)
        progress(f"starts: round {round_ + 1} of {plan.start_warmup + plan.starts}")
    return samples


@contextlib.contextmanager
def _plain_kernel() -> Iterator[Callable[[], int]]:
    """``execute("pass")`` on a plain ipykernel through jupyter_client: no gateway at all.

    The floor under any gateway's round trip: Kernel Gateway's own kernel
    spec and transport (``tcp``), driven over ZeroMQ directly.
    """
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name=KERNEL_GATEWAY_SPEC, startup_timeout=TIMEOUT_S)

    def execute() -> int:
        started = time.perf_counter_ns()
        msg_id = kc.execute(CODE, store_history=False)
        while kc.get_shell_msg(timeout=TIMEOUT_S)["parent_header"].get("msg_id") != msg_id:
            pass
        elapsed = time.perf_counter_ns() - started
        while True:
            message = kc.get_iopub_msg(timeout=TIMEOUT_S)
            if (
                message["parent_header"].get("msg_id") == msg_id
                and message["msg_type"] == "status"
                and message["content"]["execution_state"] == "idle"
            ):
                return elapsed

    try:
        yield execute
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def _round_trips(
    plan: Plan, sandkernel: Server, kg: Server, kg_nodelay: Server
) -> dict[str, list[int]]:
    servers = {"sandkernel": sandkernel, "kernel_gateway": kg, "kernel_gateway_nodelay": kg_nodelay}
    with contextlib.ExitStack() as stack:
        runs: dict[str, Callable[[], int]] = {}
        for name, server in servers.items():
            kernel_id = server.new_kernel()
            stack.callback(server.delete_kernel, kernel_id)
            ws = stack.enter_context(server.channels(kernel_id))
            runs[name] = functools.partial(_execute, ws, uuid.uuid4().hex)
        runs["plain_ipykernel"] = stack.enter_context(_plain_kernel())
        for run in runs.values():
            for _ in range(plan.execute_warmup):
                run()
        _wait_pool_full(sandkernel)  # the refill after the hand-out is not part of a round trip
        names = list(runs)
        samples: dict[str, list[int]] = {name: [] for name in names}
        for block in range(plan.executes // plan.block):
            shift = block % len(names)
            for name in names[shift:] + names[:shift]:
                samples[name] += [runs[name]() for _ in range(plan.block)]
        progress(f"round trips: {plan.executes} each")
    return samples


def _ms(value: float) -> str:
    return f"{value:.2f}"


def _verdict(value: float | None, limit: float) -> str:
    if value is None:
        return "—"
    return "**met**" if value <= limit else "**not met**"


def run(*, quick: bool) -> dict[str, Any]:
    """Measure the daemon and Kernel Gateway in one run; see the module docstring."""
    plan = QUICK if quick else FULL
    machine = machine_info()
    prespawn = plan.start_warmup + plan.starts
    with tempfile.TemporaryDirectory(prefix="sk-bench-gateway-") as tmp:
        folder = Path(tmp)
        progress(f"starting the daemon and three Kernel Gateways (two with {prespawn} prespawned)")
        with (
            _sandkernel(folder) as sandkernel,
            _kernel_gateway(folder, "Kernel Gateway") as kg,
            _kernel_gateway(folder, "Kernel Gateway prespawn", prespawn) as kg_prespawn,
            _kernel_gateway(folder, "Kernel Gateway nodelay", prespawn, nodelay=True) as kg_nodelay,
        ):
            starts = _starts(plan, sandkernel, kg, kg_prespawn, kg_nodelay)
            trips = _round_trips(plan, sandkernel, kg, kg_nodelay)
            pool = _pool_stats(sandkernel)
    load_after = machine_info()["load_average"]

    start = {name: summary(ns_to_ms([sum(p.values()) for p in ps])) for name, ps in starts.items()}
    # Where each start's time goes: the median of each phase.
    phase_ms = {
        name: {phase: round(median(ns_to_ms([p[phase] for p in ps])), 2) for phase in ps[0]}
        for name, ps in starts.items()
    }
    trip = {name: summary(ns_to_ms(ns)) for name, ns in trips.items()}
    sk = start["sandkernel"]

    def start_row(label: str, baseline: str, stat: str, limit: float, goal: str) -> list[Any]:
        value = ratio(sk[stat], start[baseline][stat], digits=3)
        return [
            f"start, {label}, {'p50' if stat == 'median' else stat} of {plan.starts} (ms)",
            _ms(sk[stat]),
            _ms(start[baseline][stat]),
            "—" if value is None else f"{value:.3f}",
            f"{goal} ({_verdict(value, limit)})",
        ]

    rows: list[list[Any]] = []
    for stat in ("median", "p99"):
        rows.append(start_row("vs KG", "kernel_gateway", stat, 1 / 20, "≤ 0.05, 20× faster"))
    for stat in ("median", "p99"):
        rows.append(
            start_row(
                f"vs KG prespawned kernel (prespawn_count={prespawn})",
                "kernel_gateway_prespawned",
                stat,
                1.0,
                "≤ 1.0, no slower",
            )
        )
    for stat in ("median", "p99"):
        rows.append(
            start_row(
                "vs KG prespawned kernel, KG with TCP_NODELAY",
                "kernel_gateway_nodelay_prespawned",
                stat,
                1.0,
                "≤ 1.0, no slower",
            )
        )
    for stat in ("median", "p99"):
        rows.append(
            start_row(
                f"vs KG `POST` with prespawn_count={prespawn}",
                "kernel_gateway_prespawn_post",
                stat,
                1.0,
                "≤ 1.0, no slower",
            )
        )
    for stat in ("median", "p99"):
        value = ratio(trip["sandkernel"][stat], trip["kernel_gateway"][stat])
        rows.append(
            [
                f'`execute("{CODE}")` round trip, {"p50" if stat == "median" else stat} '
                f"of {plan.executes} (ms)",
                _ms(trip["sandkernel"][stat]),
                _ms(trip["kernel_gateway"][stat]),
                "—" if value is None else f"{value:.2f}",
                f"≤ 1.2 ({_verdict(value, 1.2)})",
            ]
        )

    for stat in ("median", "p99"):
        value = ratio(trip["sandkernel"][stat], trip["kernel_gateway_nodelay"][stat])
        rows.append(
            [
                f"same round trip, KG with TCP_NODELAY, {'p50' if stat == 'median' else stat} (ms)",
                _ms(trip["sandkernel"][stat]),
                _ms(trip["kernel_gateway_nodelay"][stat]),
                "—" if value is None else f"{value:.2f}",
                f"≤ 1.2 ({_verdict(value, 1.2)})",
            ]
        )

    floor = trip["plain_ipykernel"]
    for stat in ("median", "p99"):
        rows.append(
            [
                f"same round trip, plain ipykernel over ZeroMQ (no gateway), "
                f"{'p50' if stat == 'median' else stat} (ms)",
                _ms(trip["sandkernel"][stat]),
                _ms(floor[stat]),
                f"{ratio(trip['sandkernel'][stat], floor[stat]):.2f}",
                "— (the floor)",
            ]
        )

    notes = [
        f"Indicative figures: {machine['cpu_count']} CPUs shared with other work "
        f"(load average {machine['load_average']} before, {load_after} after).",
        f"sandkernel: the daemon on TCP with a token, pool of {POOL_SIZE}, nothing prewarmed, "
        f"policy default (kernel spec `{SANDKERNEL_SPEC}`); the pool refilled, untimed, "
        f"between start samples. Pool after the run: {pool['hits']} hits, "
        f"{pool['misses']} misses.",
        f"Kernel Gateway {version('jupyter-kernel-gateway')} (kernel spec "
        f"`{KERNEL_GATEWAY_SPEC}`, ipykernel {version('ipykernel')}, unsandboxed). Its "
        "`POST /api/kernels` never hands out a prespawned kernel; the prespawned figure is "
        "`GET /api/kernels` and the first unused one, which no stock client does.",
        "KG with TCP_NODELAY: the same Kernel Gateway with a config file that sets "
        "`set_nodelay(True)` on its WebSockets (neither Kernel Gateway nor jupyter_server "
        "does, so its frames wait out the client's delayed ACK, about 40 ms); a baseline "
        "without that stall, also prespawned.",
        f"Start: {plan.start_warmup} warm-up round(s), then {plan.starts}; the five variants "
        "take turns, their order rotated every round. p99 of so few is close to the maximum.",
        "Where a start goes, medians in ms (request: the POST, or the GET of the prespawned "
        "kernels; connect: the WebSocket's opening; first reply: execute to reply): "
        + "; ".join(
            f"{name}: " + ", ".join(f"{phase} {ms:.1f}" for phase, ms in phases.items())
            for name, phases in phase_ms.items()
        )
        + ".",
        f"Round trips: {plan.execute_warmup} warm-up each, then {plan.executes} each in blocks "
        f"of {plan.block}, the order of the four rotating, all kernels held at once. The "
        "floor is a plain ipykernel driven by jupyter_client over ZeroMQ, `tcp` transport "
        "like Kernel Gateway's kernels: its row's KG column is that floor.",
    ]
    return {
        "title": "Jupyter Kernel Gateway API: the daemon against Jupyter Kernel Gateway",
        "quick": quick,
        "machine": machine,
        "load_average_after": load_after,
        "plan": asdict(plan),
        "prespawn_count": prespawn,
        "versions": {
            pkg: version(pkg)
            for pkg in ("jupyter-kernel-gateway", "jupyter-server", "ipykernel", "websockets")
        },
        "start_ms": start,
        "start_phase_median_ms": phase_ms,
        "round_trip_ms": trip,
        "pool": pool,
        "ratios": {
            "start_vs_kg_median": ratio(sk["median"], start["kernel_gateway"]["median"], digits=3),
            "start_vs_kg_p99": ratio(sk["p99"], start["kernel_gateway"]["p99"], digits=3),
            "start_vs_prespawned_median": ratio(
                sk["median"], start["kernel_gateway_prespawned"]["median"], digits=3
            ),
            "start_vs_prespawned_p99": ratio(
                sk["p99"], start["kernel_gateway_prespawned"]["p99"], digits=3
            ),
            "start_vs_nodelay_prespawned_median": ratio(
                sk["median"], start["kernel_gateway_nodelay_prespawned"]["median"], digits=3
            ),
            "round_trip_nodelay_median": ratio(
                trip["sandkernel"]["median"], trip["kernel_gateway_nodelay"]["median"]
            ),
            "round_trip_median": ratio(
                trip["sandkernel"]["median"], trip["kernel_gateway"]["median"]
            ),
            "round_trip_p99": ratio(trip["sandkernel"]["p99"], trip["kernel_gateway"]["p99"]),
        },
        "samples_ms": {
            "start": {
                name: [{phase: round(ns / 1e6, 3) for phase, ns in p.items()} for p in ps]
                for name, ps in starts.items()
            },
            "round_trip": {
                name: [round(ms, 3) for ms in ns_to_ms(ns)] for name, ns in trips.items()
            },
        },
        "table": {
            "columns": ["metric", "sandkernel", "Kernel Gateway", "sandkernel ÷ KG", "target"],
            "rows": rows,
        },
        "notes": notes,
    }
