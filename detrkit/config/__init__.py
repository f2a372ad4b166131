"""Lazy configs: `LazyCall`/`L`, `LazyConfig` (load, save, apply_overrides), `instantiate`,
and `get_config` for the configs bundled under detrkit/config/configs/."""

from .instantiate import InstantiationError, instantiate
from .lazy import (
    ConfigError,
    ConfigFileNotFoundError,
    ConfigImportError,
    L,
    LazyCall,
    LazyConfig,
    dotted_name,
    get_config,
    locate,
)

__all__ = [
    "ConfigError",
    "ConfigFileNotFoundError",
    "ConfigImportError",
    "InstantiationError",
    "L",
    "LazyCall",
    "LazyConfig",
    "dotted_name",
    "get_config",
    "instantiate",
    "locate",
]
