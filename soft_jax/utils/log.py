"""Progress lines: one `log` for every wing, printed by process 0 alone."""

from __future__ import annotations

import contextlib
import logging
import re
import time

import jax


def log(msg: str, tag: str = "", clock: bool = False) -> None:
    """Print `[tag HH:MM:SS] msg` (the parts given) from process 0 only, flushed."""
    if jax.process_index() != 0:
        return
    prefix = " ".join(p for p in (tag, time.strftime("%H:%M:%S") if clock else "") if p)
    print(f"[{prefix}] {msg}" if prefix else msg, flush=True)


# an object's repr inside a message ("See full TensorStore details: <bound method ...>"), up
# to its end or the end of the line: it names an object, not the problem
_REPR = re.compile(r"\s*(?:See full \w+ details:\s*)?<[^<>]*(?:>|$)")


def _shorten(text: str, limit: int) -> str:
    """`text` cut at a word boundary to at most `limit` characters (marked with ...)."""
    if len(text) <= limit:
        return text
    cut = text[:limit - 4]
    return (cut.rsplit(" ", 1)[0] if " " in cut else cut) + " ..."


def _message(e: BaseException, limit: int) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {_shorten(_REPR.sub('', lines[0]) if lines else '', limit)}"


def one_line(e: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message` without object reprs, cut at a word boundary to at
    most `limit` characters, followed by the same of the exception it was raised from."""
    cause = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    text = _message(e, limit)
    return text if cause is None else f"{text} (from {_message(cause, limit)})"


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
