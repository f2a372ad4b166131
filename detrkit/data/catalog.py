"""Registries of datasets (name -> function returning records) and their metadata.

A dataset is registered once under a name and loaded lazily: `DatasetCatalog.get(name)` calls the
registered function, which returns a list of records
`{file_name, height, width, image_id, annotations: [{bbox, bbox_mode, category_id, iscrowd}]}`.
`MetadataCatalog.get(name)` returns a `Metadata` object holding what the rest of the pipeline
needs to know about the dataset: `thing_classes` (the class names, index = contiguous id),
`thing_dataset_id_to_contiguous_id`, `json_file`, `image_root` and `evaluator_type`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

__all__ = ["DatasetCatalog", "Metadata", "MetadataCatalog"]


def _unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    listing = ", ".join(sorted(known)) if known else "(none)"
    return f"{kind} {name!r} is not registered.{hint} Registered: {listing}"


class _DatasetCatalog(dict):
    """name -> zero-argument function returning the dataset's list of records."""

    def register(self, name: str, func: Callable[[], list[dict]]) -> None:
        if not callable(func):
            raise TypeError(
                f"DatasetCatalog.register({name!r}, ...): expected a function returning a list "
                f"of dicts, got {type(func).__name__}"
            )
        if name in self:
            raise KeyError(
                f"Dataset {name!r} is already registered; call DatasetCatalog.remove({name!r}) "
                "first to replace it"
            )
        self[name] = func

    def get(self, name: str) -> list[dict]:  # type: ignore[override]
        try:
            func = self[name]
        except KeyError:
            raise KeyError(_unknown_name_message("Dataset", name, list(self))) from None
        records = func()
        if not isinstance(records, list):
            raise TypeError(
                f"The function registered for dataset {name!r} returned {type(records).__name__};"
                " it must return a list of dicts"
            )
        return records

    def list(self) -> list[str]:
        return list(self.keys())

    def remove(self, name: str) -> None:
        self.pop(name)

    def __str__(self) -> str:
        return f"DatasetCatalog(registered datasets: {', '.join(self.keys())})"

    __repr__ = __str__


DatasetCatalog = _DatasetCatalog()


class Metadata:
    """Attribute-style bag of facts about one dataset.

    `Metadata(name=...).set(thing_classes=[...])`; reading a missing attribute raises an
    AttributeError that lists what is set. Setting an attribute that is already set to a different
    value is an error, so two parts of the code cannot silently disagree about a dataset.
    """

    def __init__(self, name: str = "", **kwargs: Any) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "_fields", {})
        self.set(**kwargs)

    def __getattr__(self, key: str) -> Any:
        fields = self.__dict__.get("_fields", {})
        if key in fields:
            return fields[key]
        raise AttributeError(
            f"Metadata of dataset {self.__dict__.get('name', '')!r} has no attribute {key!r}; "
            f"it has: {sorted(fields)}"
        )

    def __setattr__(self, key: str, value: Any) -> None:
        if key == "name":
            raise AttributeError("Metadata.name is fixed when the metadata is created")
        old = self._fields.get(key, _MISSING)
        if old is not _MISSING and old != value:
            raise ValueError(
                f"Metadata of dataset {self.name!r}: {key!r} is already {old!r}; refusing to "
                f"change it to {value!r}. Call MetadataCatalog.remove({self.name!r}) to start over."
            )
        self._fields[key] = value

    def set(self, **kwargs: Any) -> Metadata:
        for k, v in kwargs.items():
            setattr(self, k, v)
        return self

    def get(self, key: str, default: Any = None) -> Any:
        return self._fields.get(key, default)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self._fields}

    def __contains__(self, key: str) -> bool:
        return key in self._fields

    def __repr__(self) -> str:
        return f"Metadata({', '.join(f'{k}={v!r}' for k, v in self.as_dict().items())})"


_MISSING = object()


class _MetadataCatalog(dict):
    """name -> Metadata; `get` creates an empty Metadata on first use (like detectron2)."""

    def get(self, name: str) -> Metadata:  # type: ignore[override]
        if not isinstance(name, str) or not name:
            raise KeyError(
                f"MetadataCatalog.get: a dataset name must be a non-empty str, got {name!r}"
            )
        meta = super().get(name)
        if meta is None:
            meta = self[name] = Metadata(name=name)
        return meta

    def list(self) -> list[str]:
        return list(self.keys())

    def remove(self, name: str) -> None:
        self.pop(name, None)


MetadataCatalog = _MetadataCatalog()
