"""Real Jupyter clients and the servers they run in, for the gateway's client tests.

Everything here speaks only the public Jupyter REST and WebSocket protocols, so
the same helpers drive sandkernel's daemon and the stock Jupyter Kernel
Gateway (the reference the tests are debugged against).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from websockets.sync.client import ClientConnection, connect

#: What a server process may take to answer its first request.
START_TIMEOUT_S = 60.0
#: The last lines of a server's output shown when something fails.
LOG_TAIL_LINES = 60


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServerProcess:
    """A server run as a child process: output kept in a file, always stopped and reaped.

    Args:
        name: what the server is, for messages.
        argv: its command line.
        log: the file its stdout and stderr go to.
        env: extra environment variables.
    """

    def __init__(
        self, name: str, argv: list[str], log: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                # its own process group, so that whatever it starts can be killed with it
                start_new_session=True,
            )

    def output(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines the server wrote."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError as exc:
            return f"(no output: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def describe(self) -> str:
        """The server's command line, state and last output, for a failure message."""
        code = self.process.poll()
        state = "running" if code is None else f"exited with {code}"
        return f"{self.name} ({state}): {' '.join(self.argv)}\n--- output ---\n{self.output()}"

    def wait_http(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = START_TIMEOUT_S,
        ready: Callable[[httpx.Response], bool] = lambda r: r.status_code == 200,
    ) -> None:
        """Poll ``url`` until ``ready`` holds; fail with the server's output on exit or timeout."""
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        with httpx.Client(timeout=5.0) as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited before it was ready\n{self.describe()}")
                try:
                    response = client.get(url, headers=dict(headers or {}))
                except httpx.TransportError as exc:
                    last = repr(exc)
                else:
                    if ready(response):
                        return
                    if response.status_code in (401, 403):
                        raise RuntimeError(
                            f"{self.name} refused the credentials at {url}: "
                            f"{response.status_code} {response.text[:200]}\n{self.describe()}"
                        )
                    last = f"{response.status_code} {response.text[:200]}"
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{self.name} not ready after {timeout_s:.0f} s at {url} (last: {last})\n"
                        + self.describe()
                    )
                # a poll interval, not a wait for an event: the server has no other signal
                time.sleep(0.1)

    def stop(self, *, grace_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL of the server and everything it started. Idempotent."""
        try:
            family = [psutil.Process(self.process.pid)]
            family += family[0].children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(grace_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for proc in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        self.process.wait()
        psutil.wait_procs(family, timeout=5)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def jupyter_env(home: Path) -> dict[str, str]:
    """Environment that keeps a Jupyter process's config, data and state in ``home``."""
    dirs = {
        "JUPYTER_CONFIG_DIR": home / "config",
        "JUPYTER_DATA_DIR": home / "data",
        "JUPYTER_RUNTIME_DIR": home / "runtime",
        "IPYTHONDIR": home / "ipython",
        "JUPYTERLAB_SETTINGS_DIR": home / "lab-settings",
        "JUPYTERLAB_WORKSPACES_DIR": home / "lab-workspaces",
    }
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    return {
        **{name: str(path) for name, path in dirs.items()},
        "JUPYTER_PLATFORM_DIRS": "1",
        "PYTHONUNBUFFERED": "1",
    }


def _jupyter(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("jupyter")), *args]


def start_kernel_gateway(
    home: Path, token: str, *, port: int | None = None, prespawn: int = 0
) -> tuple[ServerProcess, str]:
    """Jupyter Kernel Gateway on loopback with ``token``; returns it and its URL once it answers."""
    port = port or free_port()
    argv = _jupyter(
        "kernelgateway",
        "--KernelGatewayApp.ip=127.0.0.1",
        f"--KernelGatewayApp.port={port}",
        f"--KernelGatewayApp.auth_token={token}",
        # lets a client find the prespawned kernels: POST /api/kernels never hands them out
        "--JupyterWebsocketPersonality.list_kernels=True",
    )
    if prespawn:
        argv.append(f"--KernelGatewayApp.prespawn_count={prespawn}")
    home.mkdir(parents=True, exist_ok=True)
    server = ServerProcess(
        "Jupyter Kernel Gateway", argv, home / "kernel-gateway.log", jupyter_env(home)
    )
    url = f"http://127.0.0.1:{port}"
    try:
        # The gateway listens only once its prespawned kernels are up.
        server.wait_http(
            f"{url}/api",
            headers={"Authorization": f"token {token}"},
            timeout_s=START_TIMEOUT_S + 10 * prespawn,
        )
    except BaseException:
        server.stop()
        raise
    return server, url


def start_jupyter(
    app: str, home: Path, root: Path, *, gateway_url: str, gateway_token: str, token: str
) -> tuple[ServerProcess, str]:
    """``jupyter server`` or ``jupyter lab`` with its kernels on the gateway at ``gateway_url``."""
    port = free_port()
    argv = _jupyter(
        app,
        "--no-browser",
        "--allow-root",  # the sandbox tests run as root
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--ServerApp.token={token}",
        f"--ServerApp.root_dir={root}",
        f"--gateway-url={gateway_url}",
        f"--GatewayClient.auth_token={gateway_token}",
    )
    env = jupyter_env(home)
    if app == "lab":
        # No news or update toasts over the notebook in screenshots.
        settings = home / "lab-settings" / "@jupyterlab" / "apputils-extension"
        settings.mkdir(parents=True, exist_ok=True)
        (settings / "notification.jupyterlab-settings").write_text(
            json.dumps({"fetchNews": "false", "checkForUpdates": False})
        )
    server = ServerProcess(f"jupyter {app}", argv, home / f"jupyter-{app}.log", env)
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait_http(f"{url}/api/status", headers={"Authorization": f"token {token}"})
    except BaseException:
        server.stop()
        raise
    return server, url


# ---------------------------------------------------------------------------
# the Jupyter messaging protocol over a kernel's WebSocket (JSON, protocol v5)


def new_message(
    msg_type: str,
    content: dict[str, Any],
    *,
    session: str,
    channel: str = "shell",
    parent: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A Jupyter message as the JSON WebSocket protocol carries it."""
    return {
        "header": {
            "msg_id": uuid.uuid4().hex,
            "msg_type": msg_type,
            "username": "test",
            "session": session,
            "date": dt.datetime.now(dt.UTC).isoformat(),
            "version": "5.3",
        },
        "parent_header": parent or {},
        "metadata": {},
        "content": content,
        "channel": channel,
        "buffers": [],
    }


@dataclass
class Execution:
    """What one ``execute_request`` produced, in order."""

    msg_id: str
    reply: dict[str, Any] | None = None
    outputs: list[dict[str, Any]] = field(default_factory=list)
    input_requests: list[dict[str, Any]] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)

    @property
    def stdout(self) -> str:
        return "".join(
            m["content"]["text"]
            for m in self.outputs
            if m["msg_type"] == "stream" and m["content"]["name"] == "stdout"
        )

    @property
    def status(self) -> str | None:
        return None if self.reply is None else self.reply["content"]["status"]

    def data(self, mime: str) -> list[str]:
        """Every ``mime`` payload of the execution's results and displays."""
        return [
            m["content"]["data"][mime]
            for m in self.outputs
            if m["msg_type"] in ("execute_result", "display_data") and mime in m["content"]["data"]
        ]

    def summary(self) -> str:
        kinds = [m["msg_type"] for m in self.outputs]
        reply = None if self.reply is None else self.reply["content"]
        return f"reply={json.dumps(reply)[:600]} outputs={kinds} statuses={self.statuses}"


class KernelSocket:
    """Jupyter messages over one open ``/api/kernels/{id}/channels`` WebSocket.

    Made by :func:`kernel_socket`, which opens and closes the connection.
    """

    def __init__(self, ws: ClientConnection, session: str) -> None:
        self.ws = ws
        self.session = session
        #: Every message received, in order.
        self.seen: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any]) -> None:
        self.ws.send(json.dumps(message))

    def receive(self, deadline: float) -> dict[str, Any]:
        """The next message, or TimeoutError at ``deadline`` (a ``time.monotonic()``)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no message before the deadline")
        raw = self.ws.recv(timeout=remaining)
        message: dict[str, Any] = json.loads(raw)
        # The JSON protocol puts msg_type at the top level too; not every server does.
        message.setdefault("msg_type", message["header"]["msg_type"])
        self.seen.append(message)
        return message

    def request(
        self,
        msg_type: str,
        content: dict[str, Any],
        *,
        channel: str = "shell",
        timeout_s: float = 30,
    ) -> dict[str, Any]:
        """Send a request and return its reply (same channel, same parent)."""
        message = new_message(msg_type, content, session=self.session, channel=channel)
        self.send(message)
        msg_id = message["header"]["msg_id"]
        deadline = time.monotonic() + timeout_s
        while True:
            reply = self.receive(deadline)
            if reply.get("parent_header", {}).get("msg_id") == msg_id and reply[
                "msg_type"
            ].endswith("_reply"):
                return reply

    def start_execute(self, code: str, *, allow_stdin: bool = False) -> str:
        """Send an ``execute_request``; returns its msg_id."""
        message = new_message(
            "execute_request",
            {
                "code": code,
                "silent": False,
                "store_history": True,
                "user_expressions": {},
                "allow_stdin": allow_stdin,
                "stop_on_error": True,
            },
            session=self.session,
        )
        self.send(message)
        return str(message["header"]["msg_id"])

    def collect(
        self,
        msg_id: str,
        *,
        timeout_s: float = 60,
        answer_input: Callable[[dict[str, Any]], str] | None = None,
    ) -> Execution:
        """Read until ``msg_id``'s ``execute_reply`` and its ``idle`` status have both come."""
        execution = Execution(msg_id)
        deadline = time.monotonic() + timeout_s
        idle = False
        while execution.reply is None or not idle:
            try:
                message = self.receive(deadline)
            except TimeoutError:
                raise TimeoutError(
                    f"execution {msg_id} unfinished after {timeout_s} s: {execution.summary()}"
                ) from None
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = message["msg_type"]
            if kind == "execute_reply":
                execution.reply = message
            elif kind == "status":
                state = message["content"]["execution_state"]
                execution.statuses.append(state)
                idle = idle or state == "idle"
            elif kind == "input_request":
                execution.input_requests.append(message)
                if answer_input is not None:
                    self.send(
                        new_message(
                            "input_reply",
                            {"value": answer_input(message)},
                            session=self.session,
                            channel="stdin",
                            parent=message["header"],
                        )
                    )
            elif kind in ("stream", "display_data", "execute_result", "error"):
                execution.outputs.append(message)
        return execution

    def execute(
        self,
        code: str,
        *,
        timeout_s: float = 60,
        answer_input: Callable[[dict[str, Any]], str] | None = None,
    ) -> Execution:
        """Run ``code`` and wait for all it produces."""
        msg_id = self.start_execute(code, allow_stdin=answer_input is not None)
        return self.collect(msg_id, timeout_s=timeout_s, answer_input=answer_input)


@contextlib.contextmanager
def kernel_socket(
    base_url: str, kernel_id: str, headers: Mapping[str, str]
) -> Iterator[KernelSocket]:
    """A WebSocket to ``kernel_id``'s channels, opened as a notebook frontend opens it.

    The default (JSON) protocol, a fresh ``session_id`` in the query, the
    authentication in ``headers``; closed afterwards.
    """
    session = uuid.uuid4().hex
    ws_url = base_url.replace("http", "ws", 1)
    url = f"{ws_url}/api/kernels/{kernel_id}/channels?session_id={session}"
    with connect(url, additional_headers=dict(headers), max_size=None, open_timeout=30) as ws:
        yield KernelSocket(ws, session)


# ---------------------------------------------------------------------------
# Open WebUI's Jupyter code-execution engine


async def open_webui_execute(
    base_url: str, code: str, token: str, *, timeout_s: float = 60
) -> dict[str, str]:
    """Run ``code`` the way Open WebUI's Jupyter engine does, with token authentication.

    A faithful copy of the request sequence of ``JupyterCodeExecuter`` in
    open-webui/open-webui ``backend/open_webui/utils/code_interpreter.py``
    (``execute_code_jupyter``), with its token branch (``sign_in`` puts the
    token in the query string of every request; no header):

    1. ``POST api/kernels?token=T`` with no body; the kernel is ``response.json()["id"]``;
    2. ``websockets.connect("ws://…/api/kernels/{id}/channels?token=T")``, no
       ``session_id``, no subprotocol, no extra headers;
    3. one ``execute_request`` as JSON with ``channel: "shell"``, ``date: ""``,
       ``version: "5.3"``, a fresh ``session`` and no ``buffers`` key;
    4. reads messages, skipping those whose ``parent_header.msg_id`` differs,
       dispatching on the **top-level** ``msg_type`` (not the header's):
       ``stream`` → stdout/stderr, ``execute_result``/``display_data`` → a
       ``data:image/png;base64,…`` URL or the ``text/plain``, ``error`` → the
       joined traceback into stderr, ``status`` ``idle`` → done; each read
       bounded by the timeout;
    5. ``DELETE api/kernels/{id}?token=T`` and ``raise_for_status()``.

    Open WebUI uses aiohttp for the HTTP calls; httpx sends the same requests
    here (aiohttp is not a dependency of this project). Unlike Open WebUI,
    which turns every exception into ``stderr``, a failure here raises, so a
    test shows what went wrong.

    Returns:
        ``{"stdout": …, "stderr": …, "result": …}`` as ``ResultModel.model_dump()``.
    """
    import asyncio

    import websockets

    if not base_url.endswith("/"):
        base_url += "/"
    params = {"token": token}
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s) as http:
        response = await http.post("api/kernels", params=params)
        response.raise_for_status()
        kernel_id = response.json()["id"]
        try:
            ws_base = base_url.replace("http", "ws", 1)
            ws_params = "?" + "&".join(f"{key}={val}" for key, val in params.items())
            websocket_url = f"{ws_base}api/kernels/{kernel_id}/channels{ws_params}"
            async with websockets.connect(websocket_url, additional_headers={}) as ws:
                msg_id = uuid.uuid4().hex
                await ws.send(
                    json.dumps(
                        {
                            "header": {
                                "msg_id": msg_id,
                                "msg_type": "execute_request",
                                "username": "user",
                                "session": uuid.uuid4().hex,
                                "date": "",
                                "version": "5.3",
                            },
                            "parent_header": {},
                            "metadata": {},
                            "content": {
                                "code": code,
                                "silent": False,
                                "store_history": True,
                                "user_expressions": {},
                                "allow_stdin": False,
                                "stop_on_error": True,
                            },
                            "channel": "shell",
                        }
                    )
                )
                stdout, stderr, result = "", "", []
                while True:
                    try:
                        message = await asyncio.wait_for(ws.recv(), timeout_s)
                    except TimeoutError:
                        stderr += "\nExecution timed out."
                        break
                    message_data = json.loads(message)
                    if message_data.get("parent_header", {}).get("msg_id") != msg_id:
                        continue
                    match message_data.get("msg_type"):
                        case "stream":
                            if message_data["content"]["name"] == "stdout":
                                stdout += message_data["content"]["text"]
                            elif message_data["content"]["name"] == "stderr":
                                stderr += message_data["content"]["text"]
                        case "execute_result" | "display_data":
                            data = message_data["content"]["data"]
                            if "image/png" in data:
                                result.append(f"data:image/png;base64,{data['image/png']}")
                            elif "text/plain" in data:
                                result.append(data["text/plain"])
                        case "error":
                            stderr += "\n".join(message_data["content"]["traceback"])
                        case "status":
                            if message_data["content"]["execution_state"] == "idle":
                                break
        finally:
            response = await http.delete(f"api/kernels/{kernel_id}", params=params)
            response.raise_for_status()
    return {
        "stdout": stdout.strip(),
        "stderr": stderr.strip(),
        "result": "\n".join(result).strip() if result else "",
        "kernel_id": kernel_id,
    }
