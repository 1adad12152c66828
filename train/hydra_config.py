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


def compose_config(config_name: str = "demo", overrides: Sequence[str] = (), world_size: int | None = None) -> RunConfig:
    """Preset + overrides -> a validated RunConfig object; bad keys or values raise ConfigError.
    Inferred degrees (parallel.dp_shard=-1) resolve against `world_size` (default: $WORLD_SIZE or 1)."""
    overrides = [quote_split(o) for o in overrides]
    for override in overrides:
        if override.startswith("+"):
            raise ConfigError(f"{override}: adds a key the schema does not have, so nothing would read it; "
                              "drop the '+' (every field exists already, see mohge-train --print-config)")
    ConfigStore.instance().store(name=SCHEMA_NAME, node=RunConfig)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="mohge.configs", version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides))
        run: RunConfig = OmegaConf.to_object(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(hydra_error_line(err, config_name)) from err
    finally:
        GlobalHydra.instance().clear()
    if world_size is not None:
        run.parallel = run.parallel.resolved(world_size)
    run.validate()
    return run


def quote_split(override: str) -> str:
    """`data.split=969,30,1` as printed in the docs: quoted for Hydra (which reads commas as a sweep)."""
    key, eq, value = override.partition("=")
    if key == "data.split" and eq and "," in value and value[:1] not in "'\"[":
        return f"{key}='{value}'"
    return override


def hydra_error_line(err: BaseException, config_name: str) -> str:
    """A Hydra/OmegaConf failure as `<key or preset>: <problem>; <fix>` on one line."""
    causes, cause = [], err
    while cause is not None:
        causes.append(cause)
        cause = cause.__cause__
    text = str(causes[-1])
    first = text.splitlines()[0] if text else type(causes[-1]).__name__
    full_key = next((line.split(":", 1)[1].strip() for line in text.splitlines() if "full_key:" in line), None)
    if "Cannot find primary config" in text:
        return f"--config-name {config_name}: no such preset; use one of {', '.join(presets())}"
    if "Could not find '" in text:  # a group option such as model=nope
        group_option = text.split("Could not find '", 1)[1].split("'", 1)[0]
        group = group_option.split("/")[0]
        options = [line.strip() for line in text.split("Available options in", 1)[-1].splitlines()[1:]
                   if line.startswith("\t") and "=" not in line]
        return f"{group}={group_option.split('/', 1)[-1]}: no such option; use one of {', '.join(options)}"
    if "LexerNoViableAltException" in text or "Error parsing override" in text:
        bad = first.split(": ", 1)[-1] if "LexerNoViableAltException" in text else first.split("'")[1]
        return (f"{bad}: Hydra cannot parse this override; write key=value, quoting a value with spaces, "
                "commas or quotes: key='...' (key=\"it's\" for a single quote)")
    if full_key and "not in" in first:
        return f"{full_key}: no such field; check the spelling (mohge-train --print-config lists every field)"
    if full_key:
        return f"{full_key}: {first}"
    return f"{first}".replace("\n", " ")


def presets() -> list[str]:
    from importlib import resources

    return sorted(p.name[:-5] for p in resources.files("mohge.configs").iterdir() if p.name.endswith(".yaml"))


def to_yaml(run: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(run))
