"""The engine's settings: one pydantic model, :class:`EngineConfig`.

::

    config = EngineConfig(pool_size=4, session_ttl_s=600)
    async with Engine(config) as engine: ...
    async with Engine(pool_size=4) as engine: ...    # the same, validated alike

Every backend built from settings takes this model: :class:`~sandkernel.engine.Engine`,
the Ray cluster engine (which sends it, as a value, to each node's engine) and
the command line. Units are in the field names; a name the model does not know
is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Self, TypedDict

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from sandkernel.files import DEFAULT_MAX_UPLOAD_BYTES
from sandkernel.limits import MAX_TIMEOUT_S, MAX_TTL_S, module_name_problem
from sandkernel.policy import Policy

DEFAULT_PREWARM: tuple[str, ...] = ("numpy", "pandas", "matplotlib.pyplot")
#: ``max_concurrent_starts`` when kernels are forked from the zygote and it is
#: not set: a forked start costs about a tenth of a cold one's CPU and mostly
#: waits (measured: 13 new sessions/s with 2 starts in flight, 17 with 4 or 6).
FORKED_CONCURRENT_STARTS = 4


class EngineConfig(BaseModel):
    """How an engine is built: its sandbox policy, pool, sessions, files and batch workers."""

    # inf and nan are no setting: an infinite TTL is an overflow in its expiry time.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    policy: Policy | str | Path | None = Field(
        default=None,
        description="sandbox policy of pooled kernels: a shipped name, a TOML path or a "
        "Policy (default: the default policy)",
    )
    pool_size: int = Field(default=2, ge=0, description="kernels kept warm")
    max_sessions: int = Field(
        default=32, ge=1, description="sessions alive at once (active or dead-awaiting-restart)"
    )
    max_kernels: int | None = Field(
        default=None,
        ge=1,
        description="kernels alive at once (default: max_sessions + pool_size)",
    )
    max_concurrent_starts: int = Field(
        default=2,
        ge=1,
        description="kernel starts in flight (do not thrash the CPUs); with zygote=True "
        f"and this not set: {FORKED_CONCURRENT_STARTS}, as forked starts are cheap",
    )
    refill_delay_s: float = Field(
        default=0.1,
        ge=0,
        le=60,
        description="how long after handing out a kernel the pool starts its replacement, "
        "so the start does not slow the session's first cell",
    )
    session_ttl_s: float = Field(
        default=3600.0,
        gt=0,
        le=MAX_TTL_S,
        description="a session expires this long after its last activity (at most 30 days)",
    )
    idle_timeout_s: float | None = Field(
        default=None,
        gt=0,
        le=MAX_TTL_S,
        description="optional: expire a session after this long without a run",
    )
    max_lifetime_s: float | None = Field(
        default=None, gt=0, le=MAX_TTL_S, description="optional hard bound on a session's age"
    )
    acquire_timeout_s: float = Field(
        default=60.0,
        ge=0,
        le=MAX_TIMEOUT_S,
        description="how long session() waits for a kernel before raising PoolExhausted",
    )
    prewarm_imports: tuple[str, ...] = Field(
        default=DEFAULT_PREWARM,
        description="modules imported in each kernel before it is handed out",
    )
    self_check: bool = Field(
        default=True,
        description="verify each kernel's isolation before handing it out (fail closed)",
    )
    zygote: bool = Field(
        default=True,
        description="fork new kernels from a warm zygote (which has imported ipykernel and "
        "prewarm_imports) into their own sandbox, instead of starting an interpreter in it; "
        "falls back to cold starts while the zygote is unavailable; False: every kernel "
        "starts cold (one interpreter start per sandbox)",
    )
    restart_dead_kernels: bool = Field(
        default=False, description="default of Session.run(restart=...)"
    )
    python: str | Path | None = Field(
        default=None, description="the Python environment the sandbox runs (default: this one)"
    )
    runtime_dir: str | Path | None = Field(
        default=None,
        description="where kernel runtime folders live (default /run/sandkernel); on a Ray "
        "cluster, {node} is replaced by the node's tag and {node_id} by its id",
    )
    store_dir: str | Path | None = Field(
        default=None,
        description="where uploaded and produced files are kept, across restarts (default "
        "$SANDKERNEL_STATE_DIR/files or /var/lib/sandkernel/files); on a Ray cluster, with "
        "runtime_dir's replacements",
    )
    max_upload_bytes: int = Field(
        default=DEFAULT_MAX_UPLOAD_BYTES, ge=1, description="largest file accepted by upload"
    )
    produced_file_retention_s: float | None = Field(
        default=7 * 24 * 3600,
        gt=0,
        description="how long produced files stay downloadable (also after their session "
        "ended); None keeps them",
    )
    max_produced_files: int = Field(default=100, ge=0, description="files one cell may store")
    max_produced_bytes: int = Field(default=256 << 20, ge=0, description="bytes one cell may store")
    max_session_produced_bytes: int | None = Field(
        default=None,
        ge=0,
        description="bytes of produced files one session keeps in the store (default: the "
        "policy's workspace size); superseded versions are deleted first to make room",
    )
    batch_workers: int | None = Field(
        default=None,
        ge=1,
        description="sandboxed fork servers for run_once/run_many (default: the number of "
        "CPUs); started on first use",
    )
    reap_interval_s: float = Field(
        default=5.0,
        gt=0,
        le=MAX_TIMEOUT_S,
        description="how often expired sessions and files are removed",
    )

    @field_validator("python", "runtime_dir", "store_dir", mode="before")
    @classmethod
    def _not_empty(cls, path: Any) -> Any:
        # Path("") is the current folder: an empty setting is a mistake, not a wish for it.
        if isinstance(path, str) and not path:
            raise ValueError("an empty path: give a path, or leave it unset for the default")
        return path

    @field_validator("prewarm_imports")
    @classmethod
    def _module_names(cls, modules: tuple[str, ...]) -> tuple[str, ...]:
        # Each is imported by the kernel's set-up cell, its name written into the
        # cell's code: only a module's name may be (checked here, not at each start).
        for module in modules:
            problem = module_name_problem(module)
            if problem is not None:
                raise ValueError(problem)
        return modules

    @model_validator(mode="after")
    def _kernels_cover_the_pool(self) -> Self:
        if self.max_kernels is not None and self.max_kernels < self.pool_size:
            raise ValueError(
                f"max_kernels ({self.max_kernels}) must be at least pool_size ({self.pool_size})"
            )
        return self

    @model_validator(mode="after")
    def _forked_starts_run_wider(self) -> Self:
        # Derived after validation and not marked as set, so that build() with
        # another zygote derives it again instead of keeping this one's.
        if self.zygote and "max_concurrent_starts" not in self.model_fields_set:
            # The model is frozen: this is its construction, not a change.
            object.__setattr__(self, "max_concurrent_starts", FORKED_CONCURRENT_STARTS)
        return self

    @classmethod
    def build(
        cls, config: EngineConfig | None = None, settings: Mapping[str, Any] | None = None
    ) -> EngineConfig:
        """``config`` (or the defaults) with ``settings`` applied, validated.

        Raises:
            TypeError: a setting the model does not have (named, with the known ones).
            ValueError: a value out of range (pydantic's ValidationError).
        """
        settings = dict(settings or {})
        unknown = sorted(set(settings) - set(cls.model_fields))
        if unknown:
            raise TypeError(
                f"unknown engine setting(s): {', '.join(unknown)}; "
                f"the settings are EngineConfig's fields: {', '.join(cls.model_fields)}"
            )
        if config is None:
            return cls(**settings)
        if not settings:
            return config
        # Only what was set: a value derived from another field (max_concurrent_starts
        # from zygote) is derived again from the settings. The values are kept as
        # they are (a Policy stays a Policy).
        explicit = {name: getattr(config, name) for name in config.model_fields_set}
        return cls.model_validate({**explicit, **settings})


class EngineSettings(TypedDict, total=False):
    """:class:`EngineConfig`'s fields as keyword arguments, for ``Engine(**settings)``.

    Kept for static checking of ``Engine(pool_size=2)``: Python has no way to
    derive a TypedDict from a model, so ``tests/test_config.py`` checks the two
    name the same fields.
    """

    policy: Policy | str | Path | None
    pool_size: int
    max_sessions: int
    max_kernels: int | None
    max_concurrent_starts: int
    refill_delay_s: float
    session_ttl_s: float
    idle_timeout_s: float | None
    max_lifetime_s: float | None
    acquire_timeout_s: float
    prewarm_imports: Iterable[str]
    self_check: bool
    zygote: bool
    restart_dead_kernels: bool
    python: str | Path | None
    runtime_dir: str | Path | None
    store_dir: str | Path | None
    max_upload_bytes: int
    produced_file_retention_s: float | None
    max_produced_files: int
    max_produced_bytes: int
    max_session_produced_bytes: int | None
    batch_workers: int | None
    reap_interval_s: float


__all__ = ["DEFAULT_PREWARM", "EngineConfig", "EngineSettings"]
