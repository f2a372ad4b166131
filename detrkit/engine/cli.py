"""The command line shared by the tools: `--config-file`, `--resume`, `--eval-only`, process
counts, `--dist-url` and trailing `key=value` config overrides; errors a user can fix reported as
one line (`one_line_errors`)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from collections.abc import Iterator
from typing import NoReturn

from .launch import LaunchError

__all__ = [
    "UsageError",
    "check_overrides",
    "default_argument_parser",
    "default_dist_url",
    "one_line_errors",
    "user_errors",
]


def user_errors() -> tuple[type[Exception], ...]:
    """The errors whose message names the config key, file, checkpoint or image at fault."""
    # imported here: `import detrkit.engine` (which every config file does) stays light
    from detrkit.checkpoint import CheckpointError
    from detrkit.config import ConfigError
    from detrkit.data.detection_utils import ImageLoadError

    return (ConfigError, CheckpointError, ImageLoadError, FileNotFoundError)


def _prog() -> str:
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "train_net.py"


def exit_with_error(message: str, code: int) -> NoReturn:
    """`prog: error: message` on stderr (argparse's form), then exit with `code`."""
    print(f"{_prog()}: error: {message}", file=sys.stderr)
    sys.exit(code)


@contextlib.contextmanager
def one_line_errors(output_dir: str | None = None) -> Iterator[None]:
    """Report an error the user can fix as one line on stderr, and exit.

    Without `output_dir` (checking the command line and the config, before any process
    starts): a ValueError (ConfigError is one) exits with code 2, as argparse does. With it
    (the run): a `LaunchError` (its message names the failed rank and its error) or one of
    `user_errors()` exits with code 1; the traceback of the latter goes to OUTPUT_DIR/log.txt.
    """
    known = user_errors()
    try:
        yield
    except LaunchError as e:
        if output_dir is None:
            raise
        exit_with_error(str(e), code=1)
    except (*known, ValueError) as e:
        if output_dir is None:
            exit_with_error(str(e), code=2)
        if not isinstance(e, known):
            raise
        log_file = os.path.join(output_dir, "log.txt")
        with open(log_file, "a") as f:
            traceback.print_exc(file=f)
        exit_with_error(f"{e} (traceback in {log_file})", code=1)


def default_dist_url() -> str:
    """`tcp://127.0.0.1:<port>` with a port derived from the user id, so that two users of one
    machine do not collide by default (two jobs of one user need `--dist-url auto`)."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    port = 40000 + (uid * 7919) % 20000
    return f"tcp://127.0.0.1:{port}"


def _epilog(prog: str) -> str:
    return f"""
Examples:

Train on one machine with 8 GPUs (or 8 CPU processes where there is no CUDA):
    $ {prog} --num-gpus 8 --config-file cfg.py

Change config values from the command line (Hydra override grammar):
    $ {prog} --config-file cfg.py train.max_iter=100 optimizer.lr=1e-4 train.device=cpu

Evaluate a checkpoint:
    $ {prog} --config-file cfg.py --eval-only train.init_checkpoint=/path/to/model.pth

Resume an interrupted run from OUTPUT_DIR/last_checkpoint:
    $ {prog} --config-file cfg.py --resume

Train on two machines:
    (machine0)$ {prog} --machine-rank 0 --num-machines 2 --dist-url tcp://<ip0>:<port> [flags]
    (machine1)$ {prog} --machine-rank 1 --num-machines 2 --dist-url tcp://<ip0>:<port> [flags]
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with the cross-argument checks of the launcher flags."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed = super().parse_args(args, namespace)
        if (
            hasattr(parsed, "machine_rank")
            and hasattr(parsed, "num_machines")
            and parsed.machine_rank >= parsed.num_machines
        ):
            self.error(
                f"argument --machine-rank: {parsed.machine_rank} is not below "
                f"--num-machines {parsed.num_machines}; accepted: 0 .. num_machines - 1"
            )
        for item in getattr(parsed, "opts", None) or []:
            if item.startswith("-"):
                # argparse.REMAINDER takes everything after the first override, flags included
                self.error(
                    f"argument {item!r} comes after the config overrides; put flags before the "
                    "key=value overrides"
                )
        return parsed


def default_argument_parser(epilog: str | None = None) -> argparse.ArgumentParser:
    """The parser of `tools/train_net.py` (and the other tools that train or evaluate)."""
    prog = _prog()
    parser = _Parser(
        epilog=epilog if epilog is not None else _epilog(prog),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to a config file")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUTPUT_DIR/last_checkpoint (model, optimizer, iteration, scheduler, "
        "grad scaler, EMA) when it exists; without it train.init_checkpoint gives the initial "
        "weights and training starts at iteration 0",
    )
    parser.add_argument(
        "--eval-only",
        action="store_true",
        help="load train.init_checkpoint (weights only) and evaluate",
    )
    parser.add_argument(
        "--num-gpus",
        type=_positive_int,
        default=1,
        help="processes per machine: one per GPU, or CPU processes on the gloo backend when "
        "there is no CUDA",
    )
    parser.add_argument("--num-machines", type=_positive_int, default=1, help="total machines")
    parser.add_argument(
        "--machine-rank",
        type=_non_negative_int,
        default=0,
        help="the rank of this machine (unique per machine)",
    )
    parser.add_argument(
        "--dist-url",
        default=default_dist_url(),
        help="initialization URL for the process group: tcp://<machine0 ip>:<port>, or 'auto' "
        "for a free port (one machine only). Under torchrun or SLURM the environment wins.",
    )
    parser.add_argument(
        "opts",
        help="config overrides at the end of the command: key=value pairs in Hydra's grammar, "
        "e.g. train.max_iter=100 optimizer.lr=1e-4",
        default=None,
        nargs=argparse.REMAINDER,
    )
    return parser


class UsageError(ValueError):
    """A command-line, config or input mistake the user can fix; the tools report it in one line
    (exit code 2)."""


def check_overrides(items: list[str]) -> list[str]:
    """Config overrides given as KEY=VALUE; anything else is a UsageError naming it."""
    for item in items:
        if "=" not in item:
            raise UsageError(f"config override {item!r} has no '='; accepted: KEY=VALUE")
    return list(items)
