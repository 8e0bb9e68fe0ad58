"""`soft-jax train --config FILE [--config.FIELD=VALUE ...]`: run or resume a fine-tune.

    soft-jax train --config configs/tiny.py
    soft-jax train --config configs/tiny.py --config.mode=sft --config.workdir=runs/tiny_sft
    soft-jax train --config configs/llama2_13b_alpaca_soft.py

Running the same command again resumes from the work dir's latest checkpoint. Config and
data errors print one line and exit 2, a diverged run exits 3, SIGTERM / SIGINT checkpoint
and exit 0 (Ctrl-C before the first step: one line, exit 130).
"""

from __future__ import annotations

import contextlib
import logging as pylogging
import sys
import threading
from collections.abc import Sequence

from absl import logging

from soft_jax.cli.flags import (INPUT_ERRORS, INTERRUPTED, INTERRUPTED_MESSAGE, command_parser,
                                debug_requested, first_line, parse)
from soft_jax.io.checkpoint import CheckpointError
from soft_jax.train.loop import TrainingDiverged, train
from soft_jax.train.run_config import default_config
from soft_jax.utils.log import filtered, one_line


class _Brief(pylogging.Filter):
    """Log records as one short line without the traceback."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        line = record.getMessage().splitlines()[0] if record.getMessage() else ""
        record.msg, record.args = (line[:237] + "...") if len(line) > 240 else line, ()
        record.exc_info = record.exc_text = None
        return True


@contextlib.contextmanager
def brief_library_errors():
    """While training: what Orbax's background save threads log or print when a save fails
    (e.g. a full disk) as short lines, each distinct one once, instead of pages of
    tracebacks; the command then names the error itself. --debug leaves everything as is."""
    seen: set[str] = set()

    def once(value: BaseException) -> None:
        line = one_line(value)
        if line not in seen:
            seen.add(line)
            print(f"(background) {line}", file=sys.stderr, flush=True)

    hooks = sys.excepthook, threading.excepthook
    sys.excepthook = lambda kind, value, tb: once(value)  # C++ callbacks print here
    threading.excepthook = lambda a: once(a.exc_value)
    try:
        with filtered(_Brief(), logging.get_absl_logger(), pylogging.getLogger("asyncio")):
            yield
    finally:
        sys.excepthook, threading.excepthook = hooks


def _fail(msg: str, code: int) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def main(argv: Sequence[str] | None = None) -> dict:
    """`soft-jax train`, also callable from Python with the same arguments (default
    sys.argv[1:]); returns `train`'s summary (an interrupted run returns too: exit 0).

    Config and data errors raise SystemExit(2) after one line, a diverged run SystemExit(3);
    `--debug` or SOFT_JAX_DEBUG=1 shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = command_parser("train", __doc__, default_config, config_required=True)
    parser.add_argument("--verbosity", default="warning",
                        help="absl log level (debug, info, warning, error or a number); "
                             "Orbax logs every save at info")
    debug = debug_requested(argv)
    try:
        args, cfg = parse(parser, argv)
        if args.config is None:
            raise ValueError("--config FILE is required (e.g. configs/tiny.py)")
    except INPUT_ERRORS as e:
        if debug:
            raise
        _fail(f"{e} (--help for flags; --debug or SOFT_JAX_DEBUG=1 for a traceback)", 2)
    level = args.verbosity
    logging.set_verbosity(int(level) if level.lstrip("-").isdigit() else level)
    try:
        with contextlib.nullcontext() if debug else brief_library_errors():
            return train(cfg)
    except TrainingDiverged as e:
        if debug:
            raise
        _fail(first_line(e), 3)
    except (*INPUT_ERRORS, CheckpointError) as e:
        if debug:
            raise
        _fail(f"{first_line(e)} (--debug or SOFT_JAX_DEBUG=1 for a traceback)", 2)
    except KeyboardInterrupt:
        if debug:
            raise
        _fail(INTERRUPTED_MESSAGE, INTERRUPTED)
