"""Composes a RunConfig from the Hydra presets in mohge.configs plus command-line overrides."""

from __future__ import annotations

from typing import Sequence

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mohge.model.config import ConfigError
from mohge.train.config import RunConfig

SCHEMA_NAME = "mohge_schema"


def compose_config(config_name: str = "demo", overrides: Sequence[str] = ()) -> RunConfig:
    """Preset + overrides -> a validated RunConfig object; bad keys or values raise ConfigError."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=RunConfig)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="mohge.configs", version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides))
        run: RunConfig = OmegaConf.to_object(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"config '{config_name}' with overrides {list(overrides)}: {err}") from err
    finally:
        GlobalHydra.instance().clear()
    run.validate()
    return run


def to_yaml(run: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(run))
