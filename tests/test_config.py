"""EngineConfig: the one model of the engine's settings, and how Engine takes it."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from pydantic import ValidationError

from sandkernel.config import (
    DEFAULT_PREWARM,
    FORKED_CONCURRENT_STARTS,
    EngineConfig,
    EngineSettings,
)
from sandkernel.engine import Engine
from sandkernel.policy import load_policy


def test_the_keyword_settings_are_the_model_fields() -> None:
    assert list(EngineSettings.__annotations__) == list(EngineConfig.model_fields)


def test_every_field_has_a_default_and_a_description() -> None:
    EngineConfig()  # every field has a default
    for name, field in EngineConfig.model_fields.items():
        assert field.description, name


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(ValidationError, match="pool_sise"):
        EngineConfig(pool_sise=2)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "settings",
    [
        {"pool_size": -1},
        {"max_sessions": 0},
        {"max_concurrent_starts": 0},
        {"session_ttl_s": 0},
        {"reap_interval_s": -1},
        {"max_upload_bytes": 0},
        {"batch_workers": 0},
        {"max_kernels": 1, "pool_size": 2},
        # inf, nan or 1e12 s are no TTL: their expiry times overflow datetime
        {"session_ttl_s": float("inf")},
        {"session_ttl_s": 1e12},
        {"idle_timeout_s": float("nan")},
        {"max_lifetime_s": 31 * 24 * 3600},
        {"produced_file_retention_s": float("inf")},
        {"acquire_timeout_s": 1e9},
    ],
)
def test_out_of_range_values_are_refused(settings: dict[str, float]) -> None:
    with pytest.raises(ValidationError):
        EngineConfig(**settings)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "module", ["numpy pandas", "os; import sys", "a'b", "", "numpy.", "class", "numpy.lambda"]
)
def test_a_prewarm_import_that_is_not_a_module_name_is_refused(module: str) -> None:
    with pytest.raises(ValidationError, match="not a module name"):
        EngineConfig(prewarm_imports=("numpy", module))
    assert EngineConfig(prewarm_imports=("numpy", "os.path")).prewarm_imports == (
        "numpy",
        "os.path",
    )


def test_build_applies_settings_over_a_config() -> None:
    policy = load_policy(None)
    base = EngineConfig(policy=policy, pool_size=3, prewarm_imports=["json"])  # type: ignore[arg-type]
    assert base.prewarm_imports == ("json",)
    built = EngineConfig.build(base, {"max_sessions": 4})
    assert (built.pool_size, built.max_sessions, built.policy) == (3, 4, policy)
    assert EngineConfig.build(base, {}) is base
    assert EngineConfig.build(None, {}) == EngineConfig()
    with pytest.raises(TypeError, match="unknown engine setting.*pool_sise.*pool_size"):
        EngineConfig.build(base, {"pool_sise": 1})


def test_a_config_survives_pickling() -> None:
    config = EngineConfig(policy=load_policy(None), store_dir=Path("/srv/{node}"))
    assert pickle.loads(pickle.dumps(config)) == config  # noqa: S301 - our own bytes


def test_engine_takes_a_config_or_its_fields() -> None:
    config = EngineConfig(pool_size=0, max_sessions=3, store_dir="/tmp/unused")  # noqa: S108
    from_config = Engine(config)
    from_keywords = Engine(pool_size=0, max_sessions=3, store_dir="/tmp/unused")  # noqa: S108
    assert from_config.config == from_keywords.config == config
    assert (from_config.max_sessions, from_config.max_kernels) == (3, 3)
    assert Engine(config, max_sessions=5).max_sessions == 5
    assert Engine().prewarm_imports == DEFAULT_PREWARM


def test_engine_refuses_unknown_settings_by_name() -> None:
    with pytest.raises(TypeError, match="pool_sise"):
        Engine(pool_sise=2)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="pool_size"):
        Engine(pool_size=-1)


def test_build_derives_max_concurrent_starts_from_the_zygote_it_ends_with() -> None:
    forked = EngineConfig.build(EngineConfig(zygote=False), {"zygote": True})
    assert forked.max_concurrent_starts == FORKED_CONCURRENT_STARTS
    cold = EngineConfig.build(EngineConfig(zygote=True), {"zygote": False})
    assert cold.max_concurrent_starts == 2
    # A value that was set is kept, whatever the zygote.
    for zygote in (True, False):
        built = EngineConfig.build(EngineConfig(max_concurrent_starts=3), {"zygote": zygote})
        assert built.max_concurrent_starts == 3
    # Derived, it was not set: the settings a config was built from are kept as they were.
    assert EngineConfig(zygote=True).model_fields_set == {"zygote"}


@pytest.mark.parametrize("field", ["store_dir", "runtime_dir", "python"])
def test_an_empty_path_is_refused_not_taken_as_the_current_folder(field: str) -> None:
    with pytest.raises(ValidationError, match=f"{field}\n.*an empty path: give a path, or leave"):
        EngineConfig(**{field: ""})  # type: ignore[arg-type]
    assert getattr(EngineConfig(**{field: "/srv/x"}), field) == "/srv/x"  # type: ignore[arg-type]
