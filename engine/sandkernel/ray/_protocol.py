"""What the driver and the host actors exchange, and the ids that route calls.

Pure data and pure functions: no Ray, no processes, so they are tested alone.

Ids carry the node that holds their object, so a driver routes a call with a
dictionary lookup and no central router:

* a session id is ``<tag>.<name>``: ``3fa2c1d0.thread-42``;
* a file id keeps the local store's shape, ``file-`` and 24 hex digits, the
  first 8 being the tag: ``file-3fa2c1d0`` + 16 hex digits of the node's own id.

The tag is the first 8 hex digits of the Ray node id.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel

from sandkernel.config import EngineConfig
from sandkernel.engine import EngineStats

# HostClosing is sent back by hosts; it lives in the tree with the other errors.
from sandkernel.errors import BadInput
from sandkernel.errors import HostClosing as HostClosing
from sandkernel.policy import Policy

TAG_LENGTH = 8
#: The longest session name the cluster accepts: ``<tag>.<name>`` stays within 128.
MAX_NAME_LENGTH = 128 - TAG_LENGTH - 1
HOST_ACTOR_PREFIX = "sandkernel-host-"
#: Host methods a driver calls over the direct channel when it can reach it (the
#: hot path); polls, file transfers and a cell's streamed output always go through Ray.
CHANNEL_METHODS = frozenset(
    {"open_session", "find_session", "run", "interrupt", "extend", "close_session",
     "session_info", "run_batch"}
)  # fmt: skip
DEFAULT_NAMESPACE = "sandkernel"

_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._:@-]{{0,{MAX_NAME_LENGTH - 1}}}")
_QUALIFIED_SESSION = re.compile(rf"^(?P<tag>[0-9a-f]{{{TAG_LENGTH}}})\.(?P<name>.+)$")
_CLUSTER_FILE = re.compile(rf"^file-(?P<tag>[0-9a-f]{{{TAG_LENGTH}}})[0-9a-f]{{16}}$")
_LOCAL_FILE = re.compile(r"^file-[0-9a-f]{24}$")
#: Marks, in a node's store, the owner of a file claimed by a session of another node.
_ELSEWHERE = "@"


def node_tag(node_id: str) -> str:
    """The short, lower-case tag of a Ray node id (hex)."""
    tag = node_id[:TAG_LENGTH].lower()
    if len(tag) != TAG_LENGTH or not all(c in "0123456789abcdef" for c in tag):
        raise ValueError(f"not a Ray node id: {node_id!r}")
    return tag


def host_actor_name(node_id: str) -> str:
    return f"{HOST_ACTOR_PREFIX}{node_id}"


def check_name(name: str, kind: str = "session") -> None:
    """Refuse an id the local engine would refuse, or too long to carry its node's tag."""
    if not _NAME.fullmatch(name):
        raise BadInput(
            f"invalid {kind} id {name[:40]!r}: 1-{MAX_NAME_LENGTH} characters of letters, "
            "digits and ._:@- starting with a letter or digit (on a cluster, the id also "
            "carries its node's tag)"
        )


def session_id_of(tag: str, name: str) -> str:
    """The cluster-wide id of session ``name`` on the host tagged ``tag``."""
    return f"{tag}.{name}"


def parse_session_id(session_id: str) -> tuple[str, str] | None:
    """``(tag, name)`` of a cluster-wide session id, or None for a bare name."""
    match = _QUALIFIED_SESSION.match(session_id)
    return None if match is None else (match["tag"], match["name"])


def claimed_from_elsewhere(session_id: str) -> str:
    """How a node's store records its file as a session of another node's (a cluster-wide id).

    A local session id never starts with the mark, so the file is no local session's.
    """
    return f"{_ELSEWHERE}{session_id}"


def owner_id(tag: str, recorded: str) -> str:
    """The cluster-wide id of the session owning a file, from the store of the node ``tag``."""
    if recorded.startswith(_ELSEWHERE):
        return recorded[len(_ELSEWHERE) :]
    return session_id_of(tag, recorded)


def cluster_file_id(tag: str, local_id: str) -> str:
    """The cluster-wide id of a node's stored file (same shape as a local id)."""
    if not _LOCAL_FILE.match(local_id):
        raise ValueError(f"not a stored file id: {local_id!r}")
    return f"file-{tag}{local_id[5 : 5 + 16]}"


def file_tag(file_id: str) -> str | None:
    """The tag of the node holding a cluster-wide file id, or None if it is not one."""
    match = _CLUSTER_FILE.match(file_id)
    return None if match is None else match["tag"]


def expand_path(template: str | Path | None, node_id: str) -> Path | None:
    """A per-node path: ``{node}`` becomes the node's tag, ``{node_id}`` its whole id.

    Several nodes on one machine (tests, development) need distinct runtime and
    store folders; on a real cluster, one node per machine, the defaults do.
    """
    if template is None:
        return None
    text = str(template).replace("{node_id}", node_id).replace("{node}", node_tag(node_id))
    return Path(text)


@dataclass(frozen=True)
class HostConfig:
    """How a host actor builds its node's engine."""

    #: each node's engine settings; runtime_dir and store_dir may hold ``{node}``
    #: templates (see :func:`expand_path`).
    engine: EngineConfig = field(default_factory=EngineConfig)
    #: one-shot runs a host takes at once (None: the node's CPUs).
    batch_slots: int | None = None
    #: a host with no client lease for this long shuts its engine down and exits.
    lease_ttl_s: float = 60.0
    #: the host actor's nice value (Ray starts workers at 15); None leaves it.
    niceness: int | None = 0


def policy_digest(policy: Policy) -> str:
    """A digest of what a policy enforces: two engines agree on it, or they differ."""
    return hashlib.sha256(policy.model_dump_json().encode()).hexdigest()


class HostInfo(BaseModel):
    """A host actor as it describes itself."""

    node_id: str
    tag: str
    hostname: str
    address: str
    pid: int
    owner: str
    runtime_dir: str
    store_dir: str
    policy: str
    #: :func:`policy_digest` of the policy its engine enforces (its contents, not its name)
    policy_digest: str = ""
    max_sessions: int
    pool_size: int
    batch_slots: int
    started_at: float
    sandkernel_version: str
    ray_version: str
    python: str


class HostStats(BaseModel):
    """A host's figures, as its poll reports them."""

    node_id: str
    tag: str
    engine: EngineStats
    free_session_slots: int
    batch_slots: int
    batch_running: int
    clients: int


class ClusterStats(EngineStats):
    """``ClusterEngine.stats()``: the engines' figures summed, plus each host's."""

    hosts_alive: int
    hosts_lost: int
    hosts: list[HostStats]
    unavailable_nodes: dict[str, str]


@dataclass(frozen=True, slots=True)
class Raised:
    """A sandkernel error a host raised, sent back as a value (no Ray traceback wrapper)."""

    error: BaseException


@dataclass(frozen=True, slots=True)
class NeedFiles:
    """The host does not hold these files yet: copy them over, then call again."""

    file_ids: tuple[str, ...]
