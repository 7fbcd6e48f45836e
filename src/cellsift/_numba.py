"""numba's compiler with its on-disk cache, where one can be written."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numba

_logger = logging.getLogger("cellsift")
_said: list[bool] = []


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
