"""``sandkernel demo``: a short tour through the public API, with real output.

Runs a data-analysis cell in a sandboxed session (numpy, pandas, a matplotlib
chart saved as PNG), shows that the session keeps its state, then tries
three escapes and shows that the sandbox held.
"""

from __future__ import annotations

import base64
from pathlib import Path

from sandkernel.errors import BadInput
from sandkernel.results import ExecutionResult
from sandkernel.sync import Engine

ANALYSIS = """\
import numpy as np, pandas as pd, matplotlib.pyplot as plt
rng = np.random.default_rng(7)
days = pd.date_range("2026-01-01", periods=90, freq="D")
df = pd.DataFrame({"day": days, "sales": (200 + np.cumsum(rng.normal(2, 8, 90))).round(1)})
slope, intercept = np.polyfit(np.arange(90), df.sales, 1)
print(f"{len(df)} days, mean {df.sales.mean():.1f} a day, trend {slope:+.2f} a day")
df.to_csv("sales.csv", index=False)
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.plot(df.day, df.sales, label="daily sales")
ax.plot(df.day, intercept + slope * np.arange(90), "--", label=f"trend {slope:+.2f}/day")
ax.set_title("Sales over 90 days"); ax.legend(); fig.autofmt_xdate(); fig.tight_layout()
plt.show()
"""

FOLLOW_UP = "best = df.loc[df.sales.idxmax()]\nf'best day {best.day:%Y-%m-%d}: {best.sales}'"

ATTACKS = {
    "read the host's /etc/shadow": "open('/etc/shadow').read()",
    "reach the network": "import socket; socket.create_connection(('1.1.1.1', 443), timeout=2)",
    "allocate 4 GiB": "x = bytearray(4 * 1024**3)",
}


def _show(title: str, result: ExecutionResult, out_dir: Path) -> None:
    print(f"\n--- {title}: {result.status} ({result.usage.wall_ms:.0f} ms) ---")
    if result.stdout:
        print(result.stdout.rstrip())
    if result.text:
        print(f"Out: {result.text}")
    for n, display in enumerate(result.displays, 1):
        if "image/png" in display.data:
            path = out_dir / f"chart-{n}.png"
            path.write_bytes(base64.b64decode(display.data["image/png"]))
            print(f"chart saved: {path} ({path.stat().st_size} bytes)")
    for f in result.files:
        where = f.path or "displayed image"
        print(f"produced file {f.name} ({f.mime_type}, {f.size_bytes} bytes, {where}) id={f.id}")
    if result.error:
        print(f"{result.error.name}: {result.error.value}")
    if result.message:
        print(f"[{result.message}]")


def run_demo(out_dir: Path) -> int:
    """Run the tour; write charts to ``out_dir``. Returns a process exit code.

    Raises:
        BadInput: ``out_dir`` is not a folder and cannot be made one (before anything starts).
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise BadInput(f"--out {out_dir} is not a folder") from None
    except OSError as exc:
        raise BadInput(f"cannot make --out {out_dir}: {exc.strerror or exc}") from None
    with Engine(pool_size=1) as engine:
        session = engine.session("demo")
        analysis = session.run(ANALYSIS)
        _show("analysis cell", analysis, out_dir)
        _show("follow-up cell (state kept)", session.run(FOLLOW_UP), out_dir)
        held = 0
        for title, code in ATTACKS.items():
            attacker = engine.session(f"attack-{held}")
            result = attacker.run(code, timeout_s=20)
            _show(f"attack: {title}", result, out_dir)
            held += result.status != "ok"
        print(f"\n{held} of {len(ATTACKS)} escapes stopped by the sandbox")
        stats = engine.stats()
        print(f"kernels started {stats.pool.kernels_started}, sessions {len(engine.sessions())}")
    ok = analysis.status == "ok" and any("image/png" in d.data for d in analysis.displays)
    return 0 if ok and held == len(ATTACKS) else 1
