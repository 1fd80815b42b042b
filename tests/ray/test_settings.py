"""A cluster engine's settings: one EngineConfig, checked on the driver, sent to every node."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

pytest.importorskip("ray")

from sandkernel.config import EngineConfig  # noqa: E402 - after the skip
from sandkernel.policy import Policy  # noqa: E402
from sandkernel.ray import ClusterEngine  # noqa: E402

pytestmark = pytest.mark.ray


def test_the_nodes_get_one_config_with_the_policy_loaded() -> None:
    engine = ClusterEngine("auto", EngineConfig(pool_size=3), max_sessions=5, batch_slots=2)
    sent = engine._host_config
    assert (sent.engine.pool_size, sent.engine.max_sessions, sent.batch_slots) == (3, 5, 2)
    assert isinstance(sent.engine.policy, Policy)
    assert pickle.loads(pickle.dumps(sent)) == sent  # noqa: S301 - our own bytes
    assert (engine.pool_size, engine.max_sessions) == (3, 5)


@pytest.mark.parametrize("name", ["clock", "handle_sigterm"])
def test_settings_of_a_local_engine_only_are_refused(name: str) -> None:
    settings: dict[str, Any] = {name: None}
    with pytest.raises(TypeError, match=f"{name} cannot be given to a cluster's engines"):
        ClusterEngine("auto", **settings)


def test_unknown_and_out_of_range_settings_are_refused_by_name() -> None:
    with pytest.raises(TypeError, match="unknown engine setting.*pool_sise"):
        ClusterEngine("auto", pool_sise=1)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="max_sessions"):
        ClusterEngine("auto", max_sessions=0)


@pytest.mark.anyio
async def test_a_node_lost_under_a_file_call_is_a_public_error_not_an_internal_one() -> None:
    """Storing or attaching files on a host that goes: SandboxUnavailable, FileLost."""
    from sandkernel.errors import SandboxUnavailable
    from sandkernel.ray import FileLost
    from sandkernel.ray._handle import HostGone

    class GoneHost:
        node_id, lost_reason = "n1", "left the cluster"

        def describe(self) -> str:
            return "node n1"

        async def call(self, *args: object) -> object:
            raise HostGone(self)  # type: ignore[arg-type]

    engine = ClusterEngine("auto")
    engine._state = "running"
    host = GoneHost()
    engine._home = lambda: host  # type: ignore[assignment,method-assign,return-value]
    engine._file_host = lambda file_id: host  # type: ignore[assignment,method-assign,return-value]
    with pytest.raises(SandboxUnavailable, match="node n1, where the file was being stored"):
        await engine.upload(b"a\n", "a.txt")
    with pytest.raises(FileLost, match="left the cluster"):
        await engine.attach_to_agent("agent", ["file-0123456789abcdef01234567"])
