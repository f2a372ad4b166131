"""Build objects from lazy config nodes.

A mapping with a `_target_` is a call: its other keys are instantiated first (depth first), then
`_target_(**kwargs)` is called. `_target_` is a callable or a dotted import path
("torch.nn.Linear", or "package.module:attr"). Lists and tuples are instantiated element-wise,
mappings without `_target_` become plain dicts of instantiated values, and anything that is not a
config is returned as it is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .lazy import ConfigError, dotted_name, locate

__all__ = ["InstantiationError", "instantiate"]


class InstantiationError(ConfigError):
    """A config node could not be built; the message names its key path and target."""


def _where(path: str) -> str:
    return f"config key '{path}'" if path else "the config root"


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _items(cfg: Mapping[str, Any], path: str) -> list[tuple[str, Any]]:
    """Key/value pairs with interpolations resolved, naming the key when one cannot be."""
    out = []
    for key in cfg:
        try:
            out.append((key, cfg[key]))
        except OmegaConfBaseException as e:
            raise InstantiationError(f"{_where(_join(path, key))}: {e}".splitlines()[0]) from None
    return out


def _resolve_target(target: Any, path: str) -> tuple[Any, str]:
    """The callable named by a `_target_` value, and a readable name for messages."""
    if isinstance(target, (DictConfig, Mapping)):
        target = instantiate(target, _path=_join(path, "_target_"))
    if isinstance(target, str):
        try:
            return locate(target), target
        except Exception as e:
            raise InstantiationError(
                f"{_where(path)}: cannot import _target_ '{target}': {e}"
            ) from None
    if not callable(target):
        raise InstantiationError(
            f"{_where(path)}: _target_ must be a callable or a dotted import path, got {target!r}"
        )
    return target, dotted_name(target) or getattr(target, "__qualname__", repr(target))


def instantiate(cfg: Any, *, _path: str | None = None) -> Any:
    """Recursively build the objects described by `cfg` (see the module docstring).

    Errors name the key path (e.g. `model.backbone`) and the target: an import that fails, or a
    call that raises TypeError (an unknown or missing argument). Other exceptions raised by a
    target propagate with a note naming the key path.
    """
    if _path is None:
        _path = cfg._get_full_key(None) if isinstance(cfg, (DictConfig, ListConfig)) else ""
        _path = str(_path or "")

    if isinstance(cfg, ListConfig):
        values = _items(_ListView(cfg), _path)
        return [instantiate(v, _path=_join(_path, i)) for i, v in values]
    if isinstance(cfg, (list, tuple)):
        built = [instantiate(v, _path=_join(_path, i)) for i, v in enumerate(cfg)]
        return built if isinstance(cfg, list) else type(cfg)(built)

    if isinstance(cfg, DictConfig):
        if cfg._is_none():
            return None
        object_type = OmegaConf.get_type(cfg)
        if object_type is not None and dataclasses.is_dataclass(object_type):
            return OmegaConf.to_object(cfg)  # a structured config: build the dataclass itself
    if not isinstance(cfg, (DictConfig, Mapping)):
        return cfg  # not a config: pass through as is

    items = _items(cfg, _path)
    if "_target_" not in cfg:
        return {k: instantiate(v, _path=_join(_path, k)) for k, v in items}

    kwargs = {k: instantiate(v, _path=_join(_path, k)) for k, v in items if k != "_target_"}
    target, name = _resolve_target(dict(items)["_target_"], _path)
    try:
        return target(**kwargs)
    except TypeError as e:
        raise InstantiationError(f"{_where(_path)}: calling {name}(...) failed: {e}") from e
    except Exception as e:
        if hasattr(e, "add_note") and not isinstance(e, ConfigError):
            e.add_note(f"(raised while instantiating {_where(_path)}, _target_ {name})")
        raise


class _ListView(Mapping):
    """A ListConfig seen as an index -> value mapping, so `_items` can resolve it."""

    def __init__(self, lst: ListConfig) -> None:
        self._lst = lst

    def __getitem__(self, index: int) -> Any:
        return self._lst[index]

    def __iter__(self):
        return iter(range(len(self._lst)))

    def __len__(self) -> int:
        return len(self._lst)
