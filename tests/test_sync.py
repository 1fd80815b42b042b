"""The blocking facade, and SIGTERM in a process that embeds the engine."""

from __future__ import annotations

import os
import signal
import textwrap
from pathlib import Path

import pytest

from sandkernel.sandbox import CgroupLayout, iter_sandkernel_cgroups
from sandkernel.sync import Engine
from tests.conftest import engine_process, runtime_root

pytestmark = pytest.mark.sandbox


def test_sync_engine_runs_cells_with_state(tmp_path: Path) -> None:
    with Engine(
        pool_size=1, prewarm_imports=(), runtime_dir=runtime_root(), store_dir=tmp_path
    ) as engine:
        session = engine.session("sync-1")
        session.run("total = 40")
        result = session.run("total + 2")
        assert result.text == "42"
        assert engine.get_session("sync-1").id == "sync-1"
        assert [s.id for s in engine.sessions()] == ["sync-1"]
        assert engine.stats().sessions_active == 1
        session.close()
        assert engine.stats().sessions_closed == 1


def test_sigterm_in_an_embedding_process_ends_every_kernel(tmp_path: Path) -> None:
    root = tmp_path / "rt"
    ready = tmp_path / "ready"
    script = textwrap.dedent(f"""
        import pathlib, time
        from sandkernel.sync import Engine
        engine = Engine(pool_size=2, prewarm_imports=(), runtime_dir={str(root)!r},
                        store_dir={str(tmp_path / "store")!r})
        s = engine.session("x")
        s.run("1")
        pathlib.Path({str(ready)!r}).write_text(engine._engine._host.owner)
        time.sleep(60)
    """)
    with engine_process(script, ready) as (proc, owner):
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == -signal.SIGTERM
    assert [p.name for p in root.iterdir() if p.name != "owners"] == []
    assert not [p for p in iter_sandkernel_cgroups(CgroupLayout.detect()) if owner in p.name]
