"""Progress lines: one `log` for every wing, printed by process 0 alone."""

from __future__ import annotations

import contextlib
import logging
import time

import jax


def log(msg: str, tag: str = "", clock: bool = False) -> None:
    """Print `[tag HH:MM:SS] msg` (the parts given) from process 0 only, flushed."""
    if jax.process_index() != 0:
        return
    prefix = " ".join(p for p in (tag, time.strftime("%H:%M:%S") if clock else "") if p)
    print(f"[{prefix}] {msg}" if prefix else msg, flush=True)


def one_line(e: BaseException) -> str:
    """`Type: first line of the message` (at most 200 characters of it)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


@contextlib.contextmanager
def filtered(flt: logging.Filter, *loggers: logging.Logger):
    """`flt` on each of `loggers` for the duration of the block."""
    for logger in loggers:
        logger.addFilter(flt)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(flt)
