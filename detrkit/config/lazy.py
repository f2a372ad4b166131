"""Lazy configs: Python files whose top-level dicts describe objects without building them.

`L(cls)(**kwargs)` records a call as an omegaconf `DictConfig` with a `_target_` key; nothing is
constructed until `instantiate` walks the tree. `LazyConfig` loads such files (Python with relative
imports resolved by file path, or YAML), writes them back as YAML, and applies command-line
overrides in Hydra's grammar. Every error a user can cause names the file or key at fault.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import difflib
import enum
import importlib
import inspect
import logging
import os
import pathlib
import traceback
import types
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, ValueNode, open_dict

from detrkit.utils.file_io import atomic_write

__all__ = [
    "ConfigError",
    "L",
    "LazyCall",
    "LazyConfig",
    "dotted_name",
    "get_config",
    "locate",
]

logger = logging.getLogger(__name__)

# `__package__` given to modules executed by LazyConfig.load; the import hook below only rewrites
# relative imports made from modules carrying it, everything else goes to Python's own import.
_CONFIG_PACKAGE = "detrkit._lazy_config_file"
# A callable stored as a plain value (not a `_target_`) is written to YAML as
# `{_target_: detrkit.config.lazy.locate, name: <dotted path>}` and decoded back on load.
_LOCATE_TARGET = "detrkit.config.lazy.locate"
_BUNDLED_CONFIGS = pathlib.Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A problem with a config file, key, value or override that the user can fix."""


class ConfigFileNotFoundError(ConfigError, FileNotFoundError):
    """The config file (or a file it imports relatively) does not exist."""


class ConfigImportError(ConfigError, ImportError):
    """A relative import inside a config file could not be resolved."""


# ---------------------------------------------------------------------------------------------
# locating objects by dotted name


def locate(name: str) -> Any:
    """Import the object named by a dotted path: "torch.nn.Linear" or "package.module:attr.sub".

    Raises ImportError naming the path when nothing importable matches.
    """
    if not isinstance(name, str) or not name:
        raise ImportError(f"expected a dotted import path such as 'torch.nn.Linear', got {name!r}")
    if ":" in name:
        module_name, _, attr_path = name.partition(":")
        obj: Any = importlib.import_module(module_name)
        for attr in attr_path.split("."):
            if not hasattr(obj, attr):
                raise ImportError(f"module '{module_name}' has no attribute '{attr_path}'")
            obj = getattr(obj, attr)
        return obj
    parts = name.split(".")
    # Import the longest prefix that is a module, then walk attributes for the rest.
    for split in range(len(parts), 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            # Only "this prefix is not a module" means: try a shorter one. A module that exists
            # but fails to import its own dependencies is a real error to report.
            if e.name is not None and module_name.startswith(e.name):
                continue
            raise
        for attr in parts[split:]:
            if not hasattr(obj, attr):
                raise ImportError(f"'{module_name}' has no attribute '{'.'.join(parts[split:])}'")
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"no module named '{parts[0]}' (while looking up '{name}')")


def dotted_name(obj: Any) -> str | None:
    """The shortest dotted path `locate` maps back to `obj`, or None if there is none.

    Lambdas, functions defined inside functions, and things defined in config files or
    `__main__` have no such path: another process could not import them.
    """
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module or not qualname or "<" in qualname or module == "__main__":
        return None
    if module.startswith(_CONFIG_PACKAGE):
        return None
    parts = module.split(".")
    # Prefer public re-exports ("torch.optim.AdamW" over "torch.optim.adamw.AdamW").
    for i in range(1, len(parts) + 1):
        candidate = ".".join([*parts[:i], qualname])
        try:
            if locate(candidate) is obj:
                return candidate
        except Exception:
            continue
    return None


# ---------------------------------------------------------------------------------------------
# LazyCall


class LazyCall:
    """`LazyCall(target)(**kwargs)` -> a DictConfig `{_target_: target, **kwargs}`.

    `target` is a callable or a dotted import path. Dataclass types are stored by name, since
    omegaconf would otherwise turn the type itself into a structured config node.
    """

    def __init__(self, target: Callable[..., Any] | str) -> None:
        if not (callable(target) or isinstance(target, str)):
            raise TypeError(
                f"LazyCall expects a callable or a dotted import path string, got {target!r}"
            )
        self._target = target

    def __call__(self, **kwargs: Any) -> DictConfig:
        target = self._target
        if isinstance(target, type) and dataclasses.is_dataclass(target):
            name = dotted_name(target)
            if name is None:
                raise TypeError(
                    f"LazyCall: dataclass {target.__qualname__} must be importable by name "
                    "(defined at module level in an importable module)"
                )
            target = name
        return DictConfig(content={"_target_": target, **kwargs}, flags={"allow_objects": True})


L = LazyCall


# ---------------------------------------------------------------------------------------------
# executing Python config files


def _where(filename: str | os.PathLike, exc: BaseException) -> str:
    """'file:line' of the innermost traceback frame that ran inside `filename`."""
    filename = os.fspath(filename)
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == filename:
            line = frame.lineno
    return f"{filename}:{line}" if line is not None else filename


def _exec_config_file(filename: pathlib.Path) -> types.ModuleType:
    """Run a Python config file as a fresh module (never cached in sys.modules)."""
    source = filename.read_text(encoding="utf-8")
    try:
        code = compile(source, str(filename), "exec")
    except SyntaxError as e:
        raise ConfigError(
            f"syntax error in config file {e.filename}:{e.lineno}: {e.msg}"
            + (f"\n    {e.text.rstrip()}" if e.text else "")
        ) from None
    module = types.ModuleType(f"{_CONFIG_PACKAGE}.{uuid.uuid4().hex[:8]}.{filename.stem}")
    module.__file__ = str(filename)
    module.__package__ = module.__name__.rpartition(".")[0]
    try:
        exec(code, module.__dict__)
    except ConfigError:
        raise  # already names the file at fault (a nested config)
    except Exception as e:
        raise ConfigError(
            f"error while executing config file {_where(filename, e)}: {type(e).__name__}: {e}"
        ) from e
    # Public top-level dicts become configs, so an importer can write `train.max_iter = 100`.
    for name, value in list(module.__dict__.items()):
        if type(value) is dict and not name.startswith("_"):
            try:
                module.__dict__[name] = DictConfig(value, flags={"allow_objects": True})
            except Exception as e:
                raise ConfigError(
                    f"config file {filename}: '{name}' cannot be a config: {e}".splitlines()[0]
                ) from None
    return module


def _namespace_module(folder: pathlib.Path) -> types.ModuleType:
    """A stand-in package for a folder without __init__.py (e.g. `from ..common import optim`)."""
    module = types.ModuleType(f"{_CONFIG_PACKAGE}.{uuid.uuid4().hex[:8]}.{folder.name}")
    module.__file__ = str(folder / "__init__.py")
    module.__package__ = module.__name__.rpartition(".")[0]
    module.__path__ = [str(folder)]
    return module


def _load_relative_target(
    path: pathlib.Path, importer: str, spelled: str, folder_only: bool = False
) -> types.ModuleType:
    py_file = path.parent / f"{path.name}.py"
    if not folder_only and py_file.is_file():
        return _exec_config_file(py_file)
    if path.is_dir():
        init = path / "__init__.py"
        return _exec_config_file(init) if init.is_file() else _namespace_module(path)
    raise ConfigImportError(
        f"config file {importer}: 'from {spelled} import ...' looked for {py_file} "
        f"(or a folder {path}), which does not exist"
    )


def _relative_import(
    name: str, importer_globals: Mapping[str, Any], fromlist: Sequence[str], level: int
) -> types.ModuleType:
    importer = importer_globals["__file__"]
    base = pathlib.Path(importer).parent
    for _ in range(level - 1):
        base = base.parent
    spelled = "." * level + name
    target = base.joinpath(*name.split(".")) if name else base
    # `from . import x` / `from .. import x` name a folder, never a file beside it
    module = _load_relative_target(target, importer, spelled, folder_only=not name)
    for item in fromlist or ():
        if item == "*":
            continue
        if hasattr(module, item):
            continue
        # `from .models import deformable_detr_r50`: the name may be a file in that folder.
        if (target / f"{item}.py").is_file() or (target / item).is_dir():
            setattr(module, item, _load_relative_target(target / item, importer, spelled))
        else:
            raise ConfigImportError(
                f"config file {importer}: cannot import '{item}' from '{spelled}' "
                f"({module.__file__} defines no '{item}')"
            )
    return module


@contextlib.contextmanager
def _config_imports() -> Iterator[None]:
    """Resolve relative imports inside config files by their path on disk."""
    original_import = builtins.__import__

    def import_hook(name, globals=None, locals=None, fromlist=(), level=0):
        package = (globals or {}).get("__package__") or ""
        if level > 0 and package.startswith(_CONFIG_PACKAGE):
            return _relative_import(name, globals, fromlist, level)
        return original_import(name, globals, locals, fromlist, level)

    builtins.__import__ = import_hook
    try:
        yield
    finally:
        builtins.__import__ = original_import


# ---------------------------------------------------------------------------------------------
# YAML encoding of values


def _is_locate_node(node: Any) -> bool:
    return (
        isinstance(node, DictConfig)
        and not node._is_interpolation()
        and set(node.keys()) == {"_target_", "name"}
        and node._get_node("_target_")._value() == _LOCATE_TARGET
    )


def _decode_located(node: Any) -> Any:
    """Turn `{_target_: detrkit.config.lazy.locate, name: X}` nodes back into the object X."""
    if not isinstance(node, (DictConfig, ListConfig)) or node._is_interpolation():
        return node
    if node._is_none() or node._is_missing():
        return node
    keys = list(node.keys()) if isinstance(node, DictConfig) else list(range(len(node)))
    for key in keys:
        child = node._get_node(key)
        if _is_locate_node(child):
            # If it no longer imports, the node stays: instantiate() reports it with its key.
            with contextlib.suppress(Exception):
                node[key] = locate(child.name)
        else:
            _decode_located(child)
    return node


def _describe_unsaveable(value: Any) -> str:
    if inspect.isfunction(value) and value.__name__ == "<lambda>":
        return "a lambda"
    if callable(value) and "<locals>" in getattr(value, "__qualname__", ""):
        return f"the local function {value.__qualname__}"
    if callable(value) and str(getattr(value, "__module__", "")).startswith(_CONFIG_PACKAGE):
        return f"{getattr(value, '__qualname__', value)!s}, defined inside a config file"
    if callable(value) and getattr(value, "__module__", None) == "__main__":
        return f"{value.__qualname__}, defined in __main__"
    return f"an object of type {type(value).__module__}.{type(value).__qualname__}"


def _to_yaml_container(value: Any, key: str, filename: str) -> Any:
    """Plain YAML-able containers from a config; callables become dotted names."""
    if isinstance(value, (DictConfig, ListConfig)):
        if value._is_interpolation() or value._is_missing():
            return value._value()
        if value._is_none():
            return None
    if isinstance(value, ValueNode):
        value = value._value()  # the raw value: interpolations stay as written
    if isinstance(value, (DictConfig, Mapping)):
        items = (
            ((k, value._get_node(k)) for k in value)
            if isinstance(value, DictConfig)
            else value.items()
        )
        out = {}
        for k, child in items:
            child_key = f"{key}.{k}" if key else str(k)
            if k == "_target_":
                raw = child._value() if isinstance(child, ValueNode) else child
                out[k] = _target_to_string(raw, child_key, filename)
            else:
                out[k] = _to_yaml_container(child, child_key, filename)
        return out
    if isinstance(value, (ListConfig, list, tuple)):
        children = (
            (value._get_node(i) for i in range(len(value)))
            if isinstance(value, ListConfig)
            else value
        )
        return [_to_yaml_container(c, f"{key}.{i}", filename) for i, c in enumerate(children)]
    if value is None or isinstance(value, (str, bool, int, float, bytes)):
        return value
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, pathlib.PurePath):
        return str(value)
    if callable(value):
        name = dotted_name(value)
        if name is not None:
            return {"_target_": _LOCATE_TARGET, "name": name}
    raise ConfigError(
        f"cannot save config to {filename}: key '{key}' holds {_describe_unsaveable(value)}, "
        "which YAML cannot store. Use a function or class defined at module level in an "
        "importable module (e.g. detrkit.engine.optimizer.backbone_lr_factor), or an L(...)(...) "
        "node."
    )


def _target_to_string(target: Any, key: str, filename: str) -> Any:
    if isinstance(target, str):
        return target
    name = dotted_name(target)
    if name is None:
        raise ConfigError(
            f"cannot save config to {filename}: '{key}' is {_describe_unsaveable(target)}, "
            "which YAML cannot name. Use a function or class defined at module level in an "
            "importable module."
        )
    return name


# ---------------------------------------------------------------------------------------------
# overrides


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a config (containers and leaves), without resolving anything."""
    keys = []
    if (
        isinstance(node, DictConfig)
        and not node._is_interpolation()
        and not node._is_none()
        and not node._is_missing()
    ):
        for k in node:
            full = f"{prefix}.{k}" if prefix else str(k)
            keys.append(full)
            keys.extend(_all_keys(node._get_node(k), full))
    return keys


def _closest_keys(key: str, candidates: list[str]) -> list[str]:
    """Up to three existing keys spelled like `key`: the best match and any nearly as good."""
    scored = []
    for candidate in candidates:
        matcher = difflib.SequenceMatcher(None, key, candidate)
        if matcher.real_quick_ratio() >= 0.6 and matcher.quick_ratio() >= 0.6:
            scored.append((matcher.ratio(), candidate))
    scored = sorted((s for s in scored if s[0] >= 0.6), reverse=True)
    if not scored:
        return []
    best = scored[0][0]
    return [candidate for ratio, candidate in scored[:3] if ratio >= best - 0.1]


def _unknown_key_message(cfg: DictConfig, key: str, text: str, parent: Any, parent_key: str) -> str:
    suggestions = _closest_keys(key, _all_keys(cfg))
    msg = f"override '{text}': key '{key}' is not in the config."
    if suggestions:
        msg += " Did you mean " + " or ".join(f"'{s}'" for s in suggestions) + "?"
    elif isinstance(parent, DictConfig):
        siblings = [str(k) for k in parent]
        where = f"'{parent_key}'" if parent_key else "the config root"
        shown = ", ".join(siblings[:20]) + (", ..." if len(siblings) > 20 else "")
        msg += f" Keys under {where}: {shown or '(none)'}."
    return msg + f" To add a new key on purpose, write '+{key}=...'."


def _describe_value(node: Any) -> str:
    value = node._value() if hasattr(node, "_value") else node
    return f"{type(value).__name__} ({value!r})"


def _child(node: DictConfig | ListConfig, part: str) -> Any:
    if isinstance(node, ListConfig):
        if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
            return None
        return node._get_node(int(part))
    # keys(), not `in node`: a `???` value is not `in` a DictConfig but is a key of it
    return node._get_node(part) if part in node.keys() else None  # noqa: SIM118


def _apply_one_override(cfg: DictConfig, text: str, parser: Any) -> None:
    from hydra.core.override_parser.types import ValueType
    from hydra.errors import OverrideParseException

    try:
        (override,) = parser.parse_overrides([text])
    except OverrideParseException as e:
        reason = str(e).splitlines()[0]
        raise ConfigError(
            f"cannot parse override '{text}': {reason}. Expected key=value in Hydra's override "
            "grammar, e.g. train.max_iter=100, optimizer.betas=[0.9,0.99], "
            "train.output_dir='some dir'"
        ) from None
    key = override.key_or_group
    if override.package is not None:
        raise ConfigError(f"override '{text}': '@package' overrides are not supported here")
    if override.value_type not in (None, ValueType.ELEMENT):
        raise ConfigError(
            f"override '{text}' is a sweep (several values); only one value per key is accepted. "
            f"For a list value use brackets, e.g. {key}=[1,2]"
        )
    value = override.value()
    parts = key.split(".")
    adding = override.is_add() or override.is_force_add()

    node: Any = cfg
    for i, part in enumerate(parts[:-1]):
        prefix = ".".join(parts[: i + 1])
        child = _child(node, part)
        if child is None:
            if adding and isinstance(node, DictConfig):
                with open_dict(node):
                    node[part] = {}
                node = node._get_node(part)
                continue
            raise ConfigError(_unknown_key_message(cfg, key, text, node, ".".join(parts[:i])))
        if OmegaConf.is_interpolation(node, part if isinstance(node, DictConfig) else int(part)):
            child = node[part if isinstance(node, DictConfig) else int(part)]
        if not isinstance(child, (DictConfig, ListConfig)):
            raise ConfigError(
                f"override '{text}': cannot set '{key}' because '{prefix}' is "
                f"{_describe_value(child)}, not a config node with keys"
            )
        node = child

    last = parts[-1]
    parent_key = ".".join(parts[:-1])
    exists = _child(node, last) is not None

    if isinstance(node, ListConfig):
        if not exists:
            raise ConfigError(
                f"override '{text}': '{parent_key}' is a list of length {len(node)}; "
                f"'{last}' is not a valid index"
            )
        if override.is_delete():
            del node[int(last)]
        else:
            node[int(last)] = value
        return

    if override.is_delete():
        if not exists:
            raise ConfigError(_unknown_key_message(cfg, key, text, node, parent_key))
        if text.partition("=")[1] and node[last] != value:
            raise ConfigError(
                f"override '{text}': '{key}' is {node[last]!r}, not {value!r}; nothing deleted"
            )
        with open_dict(node):
            del node[last]
        return
    if override.is_add() and exists:
        raise ConfigError(
            f"override '{text}': '{key}' already exists; write '{key}=...' to change it "
            f"(or '++{key}=...' to set it whether or not it exists)"
        )
    if not exists and not adding:
        raise ConfigError(_unknown_key_message(cfg, key, text, node, parent_key))
    with open_dict(node):
        if exists and isinstance(value, dict) and isinstance(node._get_node(last), DictConfig):
            OmegaConf.update(node, last, value, merge=True)  # a dict value merges into a node
        else:
            node[last] = value


# ---------------------------------------------------------------------------------------------
# LazyConfig


class LazyConfig:
    """Load, save and override lazy configs (Python files, or YAML written by `save`)."""

    @staticmethod
    def load(filename: str | os.PathLike, keys: str | Sequence[str] | None = None) -> Any:
        """Load a `.py` or `.yaml` config file into a DictConfig.

        In a `.py` file every top-level dict or DictConfig whose name does not start with `_`
        becomes a key; modules, functions and other values are left out. Relative imports
        (`from .models.x import model`, `from ..common.train import train`) are resolved by
        the importing file's path. With `keys`, return only that key (a str) or a tuple of keys.
        """
        path = pathlib.Path(os.fspath(filename)).expanduser()
        suffix = path.suffix.lower()
        if suffix not in (".py", ".yaml", ".yml"):
            raise ConfigError(
                f"config file {filename} has an unsupported extension; expected .py, .yaml or .yml"
            )
        if not path.is_file():
            raise ConfigFileNotFoundError(
                f"config file {filename} does not exist"
                + ("" if path.is_absolute() else f" (relative to {os.getcwd()})")
            )
        path = path.resolve()
        if suffix == ".py":
            with _config_imports():
                module = _exec_config_file(path)
            content = {
                name: value
                for name, value in module.__dict__.items()
                if not name.startswith("_") and isinstance(value, (dict, DictConfig))
            }
            cfg = DictConfig(content, flags={"allow_objects": True})
        else:
            try:
                loaded = OmegaConf.load(path)
            except Exception as e:
                raise ConfigError(f"cannot read YAML config {filename}: {e}") from None
            if not isinstance(loaded, DictConfig):
                raise ConfigError(
                    f"YAML config {filename} must hold a mapping at the top level, "
                    f"not a {type(loaded).__name__}"
                )
            cfg = DictConfig(OmegaConf.to_container(loaded), flags={"allow_objects": True})
            _decode_located(cfg)
        if keys is None:
            return cfg
        if isinstance(keys, str):
            return _select_key(cfg, keys, filename)
        return tuple(_select_key(cfg, k, filename) for k in keys)

    @staticmethod
    def save(cfg: DictConfig | Mapping[str, Any], filename: str | os.PathLike) -> None:
        """Write `cfg` as YAML that `load` reads back into an equal config.

        Callable `_target_`s become dotted import paths; a callable stored as a plain value is
        written as a `locate` node and decoded back on load. Lambdas, local functions and
        other objects YAML cannot hold are refused with the key that holds them. The file is
        written to a temporary name and renamed, so a crash never leaves half a file.
        """
        filename = os.fspath(filename)
        container = _to_yaml_container(cfg, "", filename)
        text = OmegaConf.to_yaml(OmegaConf.create(container), resolve=False)
        atomic_write(filename, lambda f: f.write(text.encode("utf-8")))

    @staticmethod
    def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
        """Apply command-line overrides (Hydra's grammar) to `cfg` in place and return it.

        `a.b=v` changes an existing key (a misspelt key is an error suggesting the closest
        ones), `+a.b=v` adds a new key, `++a.b=v` sets it either way, `~a.b` deletes it.
        Values are typed by the grammar: 100 int, 1e-4 float, True bool, null None, [1,2] list,
        '${..x}' an interpolation; anything else is a string.
        """
        from hydra.core.override_parser.overrides_parser import OverridesParser

        if isinstance(overrides, str):
            overrides = [overrides]
        parser = OverridesParser.create()
        for text in overrides:
            _apply_one_override(cfg, text, parser)
        return cfg


def _select_key(cfg: DictConfig, key: str, filename: Any) -> Any:
    value = OmegaConf.select(cfg, key, default=_MISSING)
    if value is _MISSING:
        available = ", ".join(str(k) for k in cfg)
        raise ConfigError(f"config file {filename} has no key '{key}' (it has: {available})")
    return value


_MISSING = object()


def get_config(config_path: str) -> DictConfig:
    """Load a config bundled with detrkit, e.g. `get_config("common/train.py").train`.

    `config_path` is relative to detrkit/config/configs/.
    """
    path = _BUNDLED_CONFIGS / config_path
    if not path.is_file():
        available = sorted(
            p.relative_to(_BUNDLED_CONFIGS).as_posix()
            for p in _BUNDLED_CONFIGS.rglob("*.py")
            if p.name != "__init__.py"
        )
        raise ConfigFileNotFoundError(
            f"no bundled config '{config_path}'; available: {', '.join(available)}"
        )
    return LazyConfig.load(path)
