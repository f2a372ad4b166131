"""Small helpers shared by several test files."""

from __future__ import annotations

import contextlib
import logging


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def capture_logs(name: str, level: int = logging.DEBUG):
    """The records logged to logger `name` inside the block (whatever its propagation)."""
    handler = _ListHandler()
    logger = logging.getLogger(name)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def load_script(path, module_name: str):
    """A script of tools/ or demo/ as a module, so tests can call its `main(argv)` in-process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_frozen_norm(channels: int):
    """A FrozenBatchNorm2d with random affine parameters and statistics (variance in [0.1, 2])."""
    from detrkit.modeling import FrozenBatchNorm2d

    norm = FrozenBatchNorm2d(channels)
    norm.weight.uniform_(0.5, 1.5)
    norm.bias.normal_()
    norm.running_mean.normal_()
    norm.running_var.uniform_(0.1, 2.0)
    return norm
