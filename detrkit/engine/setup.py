"""What every training or evaluation process does first (`default_setup`), and the default set of
metric writers (`default_writers`)."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import random
import sys
import time
from typing import Any

import numpy as np
import torch
from iopath.common.file_io import PathManager
from omegaconf import DictConfig, OmegaConf
from tabulate import tabulate

from detrkit.utils import comm
from detrkit.utils.logger import setup_logger

from .events import CommonMetricPrinter, EventWriter, JSONWriter, TensorboardXWriter

__all__ = ["collect_env_info", "default_setup", "default_writers", "seed_all_rng"]

_path_manager = PathManager()


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _extension_status() -> str:
    try:
        ext = importlib.import_module("detrkit._C")
    except ImportError as e:
        return f"not built ({e})"
    return f"built ({os.path.basename(getattr(ext, '__file__', '') or 'detrkit._C')})"


def collect_env_info() -> str:
    """A table of the software and hardware this process runs on, for the top of `log.txt`."""
    import detrkit

    rows: list[tuple[str, Any]] = [
        ("sys.platform", sys.platform),
        ("Python", sys.version.replace("\n", " ")),
        ("numpy", np.__version__),
        ("detrkit", f"{detrkit.__version__} @{os.path.dirname(detrkit.__file__)}"),
        ("detrkit._C", _extension_status()),
        ("PyTorch", f"{torch.__version__} @{os.path.dirname(torch.__file__)}"),
        ("PyTorch debug build", torch.version.debug),
        ("CUDA available", torch.cuda.is_available()),
    ]
    if torch.cuda.is_available():
        rows.append(("CUDA (torch built with)", torch.version.cuda))
        rows.append(("cuDNN", torch.backends.cudnn.version()))
        names: dict[str, list[str]] = {}
        for i in range(torch.cuda.device_count()):
            names.setdefault(torch.cuda.get_device_name(i), []).append(str(i))
        for name, ids in names.items():
            rows.append((f"GPU {','.join(ids)}", name))
        rows.append(("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "<not set>")))
    rows.append(("CPU threads (torch)", torch.get_num_threads()))
    for package in ("fvcore", "iopath", "omegaconf", "hydra-core", "pycocotools", "tensorboard"):
        rows.append((package, _package_version(package)))
    return tabulate(rows)


def seed_all_rng(seed: int | None = None) -> int:
    """Seed python's `random`, numpy and torch; None draws a random seed. Returns the seed."""
    if seed is None:
        seed = (
            os.getpid() + int(time.time() * 1e6 % 1e9) + int.from_bytes(os.urandom(2), "big")
        ) % (2**31)
        logging.getLogger(__name__).info("Using a random seed: %d", seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    return seed


def default_setup(cfg: DictConfig, args: argparse.Namespace | None) -> None:
    """Prepare this process for a run of `cfg`:

    - create `train.output_dir`; log to `log.txt` (rank 0) or `log.txt.rankN` (others) there,
      for the `detrkit`, `projects` and `fvcore` loggers;
    - log the environment, the command line and the config file;
    - save the full config as `config.yaml` (rank 0);
    - seed python/numpy/torch with `train.seed` + rank (`train.seed` < 0 or null: a random
      seed per process, logged);
    - set `torch.backends.cudnn.benchmark` from `train.cudnn_benchmark` (default off).
    """
    output_dir = OmegaConf.select(cfg, "train.output_dir", default=None)
    rank = comm.get_rank()
    if output_dir and comm.is_main_process():
        _path_manager.mkdirs(output_dir)

    setup_logger(output_dir, distributed_rank=rank, name="fvcore")
    setup_logger(output_dir, distributed_rank=rank, name="projects")  # the models' modules
    logger = setup_logger(output_dir, distributed_rank=rank, name="detrkit")

    logger.info("Rank of current process: %d. World size: %d", rank, comm.get_world_size())
    logger.info("Environment info:\n%s", collect_env_info())
    if args is not None:
        logger.info("Command line arguments: %s", args)
        config_file = getattr(args, "config_file", "")
        if config_file:
            with _path_manager.open(config_file, "r") as f:
                logger.info("Contents of args.config_file=%s:\n%s", config_file, f.read())

    if comm.is_main_process() and output_dir:
        from detrkit.config import ConfigError, LazyConfig

        path = os.path.join(output_dir, "config.yaml")
        try:
            LazyConfig.save(cfg, path)
            logger.info("Full config saved to %s", path)
        except ConfigError as e:
            # e.g. a lambda in the config: the run itself is fine, only the YAML copy is not
            logger.warning("Could not save the config to %s: %s", path, e)

    seed = OmegaConf.select(cfg, "train.seed", default=None)
    seed = None if seed is None or int(seed) < 0 else int(seed) + rank
    seed = seed_all_rng(seed)
    logger.info("Seed of rank %d: %d", rank, seed)

    torch.backends.cudnn.benchmark = bool(
        OmegaConf.select(cfg, "train.cudnn_benchmark", default=False)
    )


def default_writers(output_dir: str, max_iter: int | None = None) -> list[EventWriter]:
    """The console printer, `metrics.json` and TensorBoard event files (the last only when the
    optional tensorboard package is installed), in the order `PeriodicWriter` runs them."""
    _path_manager.mkdirs(output_dir)
    writers: list[EventWriter] = [
        CommonMetricPrinter(max_iter),
        JSONWriter(os.path.join(output_dir, "metrics.json")),
    ]
    if importlib.util.find_spec("tensorboard") is not None:
        try:
            writers.append(TensorboardXWriter(output_dir))
        except ImportError as e:
            logging.getLogger(__name__).debug("TensorBoard writer skipped: %s", e)
    else:
        logging.getLogger(__name__).debug(
            "tensorboard is not installed; no TensorBoard event files will be written"
        )
    return writers
