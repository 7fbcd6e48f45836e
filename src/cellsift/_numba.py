"""numba's compiler with its on-disk cache, where one can be written."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numba

_logger = logging.getLogger("cellsift")
_said: list[bool] = []
#: Seconds the first call of compiled kernels may take before a note says they are being
#: compiled (:func:`first_call`); loaded from numba's cache they take about one.
NOTICE_AFTER = 5.0
_called: set[str] = set()


@contextlib.contextmanager
def first_call(what: str) -> Iterator[None]:
    """Around a call of the compiled kernels ``what``: where the first such call in this
    process takes longer than :data:`NOTICE_AFTER` seconds (numba compiling them, on the
    first run of an installation: half a minute for the triplet mining; its cache keeps
    them after), a note says so while it waits, once, rather than a silent pause."""
    rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
    if what in _called or rank != "0":  # (once, and of one process of a distributed run)
        yield
        return
    _called.add(what)
    note = threading.Timer(
        NOTICE_AFTER,
        _logger.warning,
        args=(
            "cellsift: compiling %s (on the first run of this installation only: numba "
            "keeps the compiled code in its cache) ...",
            what,
        ),
    )
    note.daemon = True
    note.start()
    try:
        yield
    finally:
        note.cancel()


def njit_cached(**options: Any) -> Callable[[Callable[..., Any]], Any]:
    """``numba.njit(cache=True, **options)``: compiled once and kept on disk (beside the
    module, in ``NUMBA_CACHE_DIR``, or in the user's cache folder). Where none of those can
    be written (a read-only install and home: a container run as another user, a service
    account), numba refuses to cache; the kernel is then compiled in each process instead,
    with the same results, and a note says so once."""

    def wrap(fn: Callable[..., Any]) -> Any:
        try:
            return numba.njit(cache=True, **options)(fn)
        except RuntimeError as err:
            if "cannot cache" not in str(err):
                raise
            if not _said:
                _said.append(True)
                _logger.info(
                    "numba cannot cache its compiled kernels here (%s): they are compiled in "
                    "each process; set NUMBA_CACHE_DIR to a writable folder to keep them",
                    err,
                )
            return numba.njit(**options)(fn)

    return wrap
