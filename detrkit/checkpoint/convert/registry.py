"""The checkpoint layouts and converters detrkit knows, and running a converter by its name.

A project teaches detrkit a layout with two calls, made when the project is imported:

- `register_layout(name, detect, hint=..., on_load=...)`: how to recognize a state dict in that
  layout (`detect(keys)`), what to tell a user who gave such a file to another `--source`
  (`hint`), and what `DetectionCheckpointer` does when it loads a file in that layout
  (`on_load`: rename the keys, or refuse with the conversion command);
- `register_converter(source, fn, description=..., options=...)`: `tools/convert_weights.py
  --source <source>` and `convert_checkpoint(source, ...)` call `fn(data, path, **options)`.

The library registers the torchvision ResNet (renamed on load; `--source torchvision`) and
detectron2's Caffe2-named ResNet (refused); `projects/deformable_detr/convert/` registers the
official Deformable-DETR and the detrex layouts. Registering a name again replaces it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Set
from dataclasses import dataclass
from typing import Any

from .common import ConversionError, ConversionResult, first, read_checkpoint, save_converted

__all__ = [
    "Converter",
    "Layout",
    "convert_checkpoint",
    "convert_file",
    "find_layout",
    "register_converter",
    "register_layout",
    "registered_sources",
    "wrong_source_message",
]

# on_load(checkpoint, path, model_keys) -> a line for the log, or None
LoadHook = Callable[[dict[str, Any], str, Set[str]], str | None]


@dataclass(frozen=True)
class Layout:
    """A family of state-dict names that detrkit recognizes in a file.

    `hint` is said when such a file is given to another `--source`; its `{path}` and
    `{expected}` (what that source expects) are filled in. `on_load(checkpoint, path,
    model_keys)` runs when `DetectionCheckpointer` loads a file in this layout: it may rewrite
    `checkpoint["model"]` in place, or raise CheckpointError to refuse the file; it returns a
    line for the log, or None.
    """

    name: str
    detect: Callable[[Set[str]], bool]
    hint: str
    on_load: LoadHook | None = None


@dataclass(frozen=True)
class Converter:
    """What `--source <source>` runs: `fn(data, path, **options)` -> ConversionResult, where
    `data` is the file as read and `options` are among the keyword names in `options`."""

    source: str
    fn: Callable[..., ConversionResult]
    description: str  # what the source expects, for messages: "a torchvision ResNet state dict"
    options: tuple[str, ...] = ()


_LAYOUTS: dict[str, Layout] = {}
_CONVERTERS: dict[str, Converter] = {}


def register_layout(
    name: str,
    detect: Callable[[Set[str]], bool],
    *,
    hint: str,
    on_load: LoadHook | None = None,
) -> None:
    """Teach detrkit to recognize a layout (see `Layout`)."""
    _LAYOUTS[name] = Layout(name, detect, hint, on_load)


def register_converter(
    source: str,
    fn: Callable[..., ConversionResult],
    *,
    description: str,
    options: Iterable[str] = (),
) -> None:
    """Make `fn` the converter of `--source <source>` (see `Converter`)."""
    _CONVERTERS[source] = Converter(source, fn, description, tuple(options))


def registered_sources() -> list[str]:
    """The `--source` names with a converter, in the order they were registered."""
    return list(_CONVERTERS)


def find_layout(keys: Iterable[str]) -> Layout | None:
    """The first registered layout whose names a state dict's keys follow, or None."""
    keys = set(keys)
    for layout in _LAYOUTS.values():
        if layout.detect(keys):
            return layout
    return None


def wrong_source_message(
    path: str, source: str, keys: Iterable[str], unknown: list[str] | None = None
) -> str:
    """Why a file is not what `--source` says, and which layout it looks like instead."""
    keys = list(keys)
    expected = _CONVERTERS[source].description
    layout = find_layout(keys)
    if layout is not None and layout.name != source:
        return layout.hint.format(path=path, expected=expected)
    unknown = keys if unknown is None else unknown
    return (
        f"{path} is not {expected}: {len(unknown)} of its {len(keys)} keys belong to no known "
        f"layout, first: {first(unknown)}"
    )


def convert_checkpoint(source: str, path: str, **options: Any) -> ConversionResult:
    """Read `path` and convert it with the converter of `source`.

    Options left at None or False are not passed on; any other must be one the converter
    takes (`--variant applies to --source official or detrex` otherwise).
    """
    converter = _CONVERTERS.get(source)
    if converter is None:
        raise ConversionError(f"unknown source {source!r}; accepted: {', '.join(_CONVERTERS)}")
    given = {k: v for k, v in options.items() if v is not None and v is not False}
    for name in given:
        if name not in converter.options:
            takers = [c.source for c in _CONVERTERS.values() if name in c.options]
            flag = "--" + name.replace("_", "-")
            if not takers:
                raise ConversionError(f"{flag} is not an option of any converter")
            raise ConversionError(f"{flag} applies to --source {' or '.join(takers)}")
    data = read_checkpoint(path)
    return converter.fn(data, path, **given)


def convert_file(source: str, path: str, output: str, **options: Any) -> ConversionResult:
    """`convert_checkpoint` then `save_converted`; refuses to overwrite the input."""
    if os.path.exists(path) and os.path.exists(output) and os.path.samefile(path, output):
        raise ConversionError(f"--output {output} is the input file; write to another path")
    result = convert_checkpoint(source, path, **options)
    save_converted(result, output)
    return result
