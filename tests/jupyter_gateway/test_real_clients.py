"""Real Jupyter clients, unchanged, on the daemon's Kernel Gateway API.

- a stock Jupyter Server started with ``--gateway-url``, driven through its own
  REST API and kernel WebSocket (never the daemon's directly);
- JupyterLab in headless Chromium, running a notebook cell that plots;
- the request sequence of Open WebUI's Jupyter code-execution engine.

The clients speak only the public protocol, so the same tests run against the
stock Jupyter Kernel Gateway with ``SANDKERNEL_TEST_GATEWAY=kernel-gateway``
(the reference the clients were checked against); the checks that only a
sandbox can pass (its uid, the kernel in the daemon's own listing) are then
skipped.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.jupyter_gateway._clients import (
    KernelSocket,
    ServerProcess,
    kernel_socket,
    open_webui_execute,
    start_jupyter,
    start_kernel_gateway,
)

pytestmark = [pytest.mark.sandbox, pytest.mark.slow]

#: Set to ``kernel-gateway`` to run these clients against stock Jupyter Kernel Gateway.
TARGET_ENV = "SANDKERNEL_TEST_GATEWAY"
#: The uid code runs as inside sandkernel's sandbox (nobody).
SANDBOX_UID = 65534
#: Where the browser's screenshots are kept (ignored by git).
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOT = "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('sandkernel')\nplt.show()"


@dataclass(frozen=True)
class Target:
    """The Kernel Gateway-compatible server under test."""

    url: str
    token: str
    kernel_name: str
    #: sandkernel's daemon (True) or the stock Kernel Gateway (False)
    sandboxed: bool

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}

    def kernel(self, kernel_id: str) -> httpx.Response:
        """The gateway's own ``GET /api/kernels/{id}``, bypassing every client under test."""
        return httpx.get(f"{self.url}/api/kernels/{kernel_id}", headers=self.headers, timeout=10)


@pytest.fixture(scope="module")
def target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    if os.environ.get(TARGET_ENV) == "kernel-gateway":
        token = secrets.token_urlsafe(16)
        server, url = start_kernel_gateway(tmp_path_factory.mktemp("kernel-gateway"), token)
        try:
            yield Target(url, token, "python3", sandboxed=False)
        finally:
            server.stop()
        return
    gateway = request.getfixturevalue("gateway")
    yield Target(gateway.url, gateway.token, "sandkernel-default", sandboxed=True)


@dataclass(frozen=True)
class JupyterServer:
    """A stock Jupyter Server (or JupyterLab) whose kernels live on the target."""

    process: ServerProcess
    url: str
    token: str
    root: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=60)


def _jupyter(
    app: str, target: Target, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[JupyterServer]:
    home = tmp_path_factory.mktemp(f"jupyter-{app}")
    root = home / "root"
    root.mkdir()
    token = secrets.token_urlsafe(16)
    process, url = start_jupyter(
        app, home, root, gateway_url=target.url, gateway_token=target.token, token=token
    )
    try:
        yield JupyterServer(process, url, token, root)
    finally:
        process.stop()


@pytest.fixture(scope="module")
def jupyter_server(
    target: Target, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[JupyterServer]:
    yield from _jupyter("server", target, tmp_path_factory)


@pytest.fixture(scope="module")
def server_kernel(jupyter_server: JupyterServer, target: Target) -> Iterator[dict[str, Any]]:
    """A kernel started through the Jupyter Server's ``POST /api/kernels``; deleted after."""
    with jupyter_server.http() as http:
        response = http.post("/api/kernels", json={"name": target.kernel_name})
        assert response.status_code == 201, (
            f"{response.status_code} {response.text}\n{jupyter_server.process.describe()}"
        )
        model: dict[str, Any] = response.json()
        try:
            yield model
        finally:
            deleted = http.delete(f"/api/kernels/{model['id']}")
    assert deleted.status_code == 204, f"{deleted.status_code} {deleted.text}"
    assert target.kernel(model["id"]).status_code == 404, "the gateway still has the kernel"


@pytest.fixture
def channels(
    jupyter_server: JupyterServer, server_kernel: dict[str, Any]
) -> Iterator[KernelSocket]:
    """A WebSocket to the kernel through the Jupyter Server, as a notebook frontend opens it."""
    with kernel_socket(jupyter_server.url, server_kernel["id"], jupyter_server.headers) as sock:
        yield sock


# ---------------------------------------------------------------------------
# a stock Jupyter Server with --gateway-url


def test_jupyter_server_lists_the_gateway_kernelspec(
    jupyter_server: JupyterServer, target: Target
) -> None:
    with jupyter_server.http() as http:
        specs = http.get("/api/kernelspecs").json()
    assert target.kernel_name in specs["kernelspecs"], sorted(specs["kernelspecs"])


def test_jupyter_server_kernel_starts_on_the_gateway(
    server_kernel: dict[str, Any], target: Target, channels: KernelSocket
) -> None:
    assert server_kernel["name"] == target.kernel_name
    on_gateway = target.kernel(server_kernel["id"])
    assert on_gateway.status_code == 200, on_gateway.text
    assert on_gateway.json()["name"] == target.kernel_name
    info = channels.request("kernel_info_request", {})
    assert info["content"]["status"] == "ok"
    assert info["content"]["language_info"]["name"] == "python"
    if target.sandboxed:
        # A gateway kernel is a sandkernel session under the same id.
        session = httpx.get(
            f"{target.url}/v1/sessions/{server_kernel['id']}",
            headers={"Authorization": f"Bearer {target.token}"},
            timeout=10,
        )
        assert session.status_code == 200, session.text
        assert session.json()["state"] == "active", session.json()


def test_jupyter_server_cells_keep_state(channels: KernelSocket) -> None:
    first = channels.execute("answer = 41\nprint('set')")
    assert first.status == "ok", first.summary()
    assert first.stdout == "set\n"
    second = channels.execute("answer + 1")
    assert second.status == "ok", second.summary()
    assert second.data("text/plain") == ["42"]
    assert first.reply is not None
    assert second.reply is not None
    assert second.reply["content"]["execution_count"] > first.reply["content"]["execution_count"]


def test_jupyter_server_input_is_answered_over_stdin(channels: KernelSocket) -> None:
    execution = channels.execute(
        "name = input('who? ')\nprint('hello', name)", answer_input=lambda request: "sandbox"
    )
    assert execution.status == "ok", execution.summary()
    assert [r["content"]["prompt"] for r in execution.input_requests] == ["who? "]
    assert execution.stdout == "hello sandbox\n"


def test_jupyter_server_interrupt_stops_a_sleep(
    jupyter_server: JupyterServer, server_kernel: dict[str, Any], channels: KernelSocket
) -> None:
    msg_id = channels.start_execute("import time\nprint('sleeping', flush=True)\ntime.sleep(100)")
    # Interrupt only once the sleep has begun, or the test would prove nothing.
    deadline = time.monotonic() + 30
    while not any(
        m["msg_type"] == "stream" and m.get("parent_header", {}).get("msg_id") == msg_id
        for m in channels.seen
    ):
        channels.receive(deadline)
    started = time.monotonic()
    with jupyter_server.http() as http:
        response = http.post(f"/api/kernels/{server_kernel['id']}/interrupt")
    assert response.status_code == 204, response.text
    execution = channels.collect(msg_id, timeout_s=15)
    assert time.monotonic() - started < 15
    assert execution.status == "error", execution.summary()
    assert execution.reply is not None
    assert execution.reply["content"]["ename"] == "KeyboardInterrupt"
    after = channels.execute("'still here'")
    assert after.data("text/plain") == ["'still here'"], after.summary()


def test_jupyter_server_matplotlib_figure_is_png(channels: KernelSocket) -> None:
    execution = channels.execute(PLOT, timeout_s=90)
    assert execution.status == "ok", execution.summary()
    images = execution.data("image/png")
    assert len(images) == 1, execution.summary()
    assert base64.b64decode(images[0]).startswith(PNG_MAGIC)


def test_jupyter_server_code_runs_as_the_sandbox_uid(
    channels: KernelSocket, target: Target
) -> None:
    execution = channels.execute("import os\nos.getuid(), os.getgid()")
    assert execution.status == "ok", execution.summary()
    if not target.sandboxed:
        pytest.skip("the stock Kernel Gateway runs kernels as its own user")
    assert execution.data("text/plain") == [f"({SANDBOX_UID}, {SANDBOX_UID})"]


def test_jupyter_server_restart_gives_a_fresh_kernel(
    jupyter_server: JupyterServer, server_kernel: dict[str, Any], target: Target
) -> None:
    # Last of the Jupyter Server tests: it ends the state the others share.
    # The WebSocket stays open across the restart, as a notebook's does.
    with kernel_socket(jupyter_server.url, server_kernel["id"], jupyter_server.headers) as sock:
        assert sock.execute("kept = 1").status == "ok"
        with jupyter_server.http() as http:
            response = http.post(f"/api/kernels/{server_kernel['id']}/restart")
        assert response.status_code == 200, response.text
        assert response.json()["id"] == server_kernel["id"]
        execution = sock.execute("'kept' in dir()")
        uid = sock.execute("import os\nos.getuid()")
    assert execution.data("text/plain") == ["False"], execution.summary()
    assert target.kernel(server_kernel["id"]).status_code == 200
    if target.sandboxed:  # the fresh kernel is sandboxed too
        assert uid.data("text/plain") == [str(SANDBOX_UID)], uid.summary()


# ---------------------------------------------------------------------------
# JupyterLab in headless Chromium

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def jupyter_lab(
    target: Target, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[JupyterServer]:
    yield from _jupyter("lab", target, tmp_path_factory)


def _notebook(kernel_name: str, display_name: str) -> dict[str, Any]:
    return {
        "cells": [
            {
                "cell_type": "code",
                "execution_count": None,
                "id": "plot",
                "metadata": {},
                "outputs": [],
                "source": PLOT,
            }
        ],
        "metadata": {
            "kernelspec": {"name": kernel_name, "display_name": display_name, "language": "python"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def test_jupyterlab_runs_a_plotting_cell_in_chromium(
    jupyter_lab: JupyterServer, target: Target, tmp_path: Path
) -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if shutil.which(p) is None]
    if missing:
        pytest.skip(
            f"{' and '.join(missing)} not installed (Debian: apt-get install chromium "
            "chromium-driver, or `make setup`)"
        )
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    with jupyter_lab.http() as http:
        spec = http.get(f"/api/kernelspecs/{target.kernel_name}").json()
    notebook = _notebook(target.kernel_name, spec["spec"]["display_name"])
    (jupyter_lab.root / "plot.ipynb").write_text(json.dumps(notebook))

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # Chromium's own sandbox cannot run as root in a container
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(argument)
    service = Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "jupyterlab-plot.png"
    plot_shot = ARTIFACTS / "jupyterlab-plot-output.png"
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.get(f"{jupyter_lab.url}/lab/tree/plot.ipynb?token={jupyter_lab.token}")
        wait = WebDriverWait(driver, 60)
        # Lab runs a cell only once the notebook's kernel is connected: wait for
        # the status bar's "<kernel> | Idle".
        kernel_status = wait.until(
            expected_conditions.presence_of_element_located(
                (By.XPATH, "//*[contains(@class, 'jp-StatusBar')]//*[contains(text(), '| Idle')]")
            )
        )
        status_text = kernel_status.text
        editor = wait.until(
            expected_conditions.element_to_be_clickable(
                (By.CSS_SELECTOR, ".jp-Notebook .jp-CodeCell .cm-content")
            )
        )
        editor.click()
        editor.send_keys(Keys.SHIFT, Keys.ENTER)
        try:
            image = wait.until(
                expected_conditions.visibility_of_element_located(
                    (By.CSS_SELECTOR, ".jp-Notebook .jp-OutputArea-output img")
                )
            )
        except TimeoutException:
            driver.save_screenshot(str(ARTIFACTS / "jupyterlab-plot-failed.png"))
            raise AssertionError(
                f"no image in the output area after 60 s (screenshot: "
                f"{ARTIFACTS / 'jupyterlab-plot-failed.png'})\n{jupyter_lab.process.describe()}"
            ) from None
        src = image.get_attribute("src") or ""
        width = driver.execute_script("return arguments[0].naturalWidth", image)
        driver.save_screenshot(str(screenshot))
        image.screenshot(str(plot_shot))
    finally:
        driver.quit()
    assert src.startswith("data:image/png;base64,"), src[:80]
    assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    assert width > 100
    assert screenshot.read_bytes().startswith(PNG_MAGIC)
    assert status_text.startswith(spec["spec"]["display_name"]), status_text
    # What the browser drew where the image is: a plot (axes, ticks, an
    # antialiased line), not a blank or broken-image box.
    with Image.open(plot_shot) as drawn:
        colors = drawn.convert("RGB").getcolors(maxcolors=1 << 16) or []
    assert len(colors) > 20, f"the plot's area is nearly uniform: {len(colors)} colours"

    # The notebook's kernel is the gateway's, on the kernelspec it asked for.
    with jupyter_lab.http() as http:
        sessions = http.get("/api/sessions").json()
    kernels = [s["kernel"] for s in sessions if s["path"].endswith("plot.ipynb")]
    assert [k["name"] for k in kernels] == [target.kernel_name], sessions
    assert target.kernel(kernels[0]["id"]).status_code == 200


# ---------------------------------------------------------------------------
# Open WebUI's Jupyter code-execution engine


@pytest.mark.anyio
async def test_open_webui_gets_stdout(target: Target) -> None:
    result = await open_webui_execute(target.url, "print('hello from the sandbox')", target.token)
    assert result["stdout"] == "hello from the sandbox", result
    assert result["stderr"] == "", result
    assert target.kernel(result["kernel_id"]).status_code == 404, "the kernel was not deleted"


@pytest.mark.anyio
async def test_open_webui_gets_a_displayed_image(target: Target) -> None:
    result = await open_webui_execute(target.url, PLOT, target.token, timeout_s=90)
    assert result["result"].startswith("data:image/png;base64,"), result
    assert base64.b64decode(result["result"].split(",", 1)[1]).startswith(PNG_MAGIC)


@pytest.mark.anyio
async def test_open_webui_gets_an_error(target: Target) -> None:
    result = await open_webui_execute(target.url, "print('before')\n1 / 0", target.token)
    assert result["stdout"] == "before", result
    assert "ZeroDivisionError" in result["stderr"], result


@pytest.mark.anyio
async def test_open_webui_finds_the_files_its_cell_wrote_stored(target: Target) -> None:
    """Open WebUI deletes the kernel at the cell's idle: what the cell wrote is stored anyway."""
    if not target.sandboxed:
        pytest.skip("/v1/sessions/{id}/files is sandkernel's API")
    code = (
        "open('/mnt/data/answer.csv', 'w').write('month,sales\\njan,3\\n')\n"
        "open('/mnt/data/model.bin', 'wb').write(bytes(50 << 20))\n"  # takes a while to store
        "print('saved')"
    )
    result = await open_webui_execute(target.url, code, target.token, timeout_s=90)
    assert result["stdout"] == "saved", result
    async with httpx.AsyncClient(base_url=target.url, timeout=10) as http:
        kernel = await http.get(f"/api/kernels/{result['kernel_id']}", headers=target.headers)
        listed = await http.get(
            f"/v1/sessions/{result['kernel_id']}/files",
            headers={"Authorization": f"Bearer {target.token}"},
        )
    assert kernel.status_code == 404, "the kernel was not deleted"
    assert listed.status_code == 200, listed.text
    sizes = {f["name"]: f["size_bytes"] for f in listed.json()["data"]}
    assert sizes.get("answer.csv") == len("month,sales\njan,3\n"), sizes
    assert sizes.get("model.bin") == 50 << 20, sizes
