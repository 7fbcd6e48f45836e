"""Small shared helpers: logging, progress bars, atomic outputs, optional dependencies."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fnmatch
import glob
import importlib
import importlib.util
import logging
import math
import numbers
import os
import re
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import ConfigError, DataError, MissingKeyError, OutputInUseError

logger = logging.getLogger("cellsift")

T = TypeVar("T")

_EXTRAS = {"tiledbsoma": "soma", "scanpy": "demo", "umap": "demo", "sklearn": "demo"}


def import_optional(module: str, extra: str | None = None) -> ModuleType:
    """Import an optional backend, or raise an error that says which extra installs it
    (``extra``, else the one that brings it), or, where it is installed but fails to
    import (a package it needs at another version), the import's own error."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        from .errors import MissingDependencyError

        top = module.split(".")[0]
        extra = extra or _EXTRAS.get(top)
        # not installed: the package itself is not found (blocked, sys.modules[name] = None,
        # counts as not installed); a part of it or a package it needs missing is a broken
        # installation
        try:
            found = sys.modules.get(top, False) is not None and (
                top in sys.modules or importlib.util.find_spec(top) is not None
            )
        except (ImportError, ValueError):
            found = False
        if found:
            raise MissingDependencyError(
                f"{module} is installed but cannot be imported ({error_text(err)}): "
                "fix that installation (the error names what it lacks, or what is at a "
                "version it does not take)."
            ) from err
        hint = f"pip install 'cellsift[{extra}]'" if extra else f"pip install {top}"
        raise MissingDependencyError(
            f"{module} is needed for this and is not installed: {hint}"
        ) from err


def is_whole(value: object, least: int | None = None) -> bool:
    """An integer (Python's or numpy's, not a bool), at least ``least`` where given."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        return False
    return least is None or bool(value >= least)


def is_number(value: object, *, nan: bool = False) -> bool:
    """A real number (Python's, numpy's or a ``numbers.Real`` such as a Fraction; not a
    bool, nor an array or tensor), not NaN unless ``nan``."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        return False
    return nan or bool(value == value)


def as_float(value: Any) -> float:
    """``float(value)`` of a real number, infinite (with its sign) where it lies beyond
    float's range (a whole number such as ``10**400``, which ``float`` refuses)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def positions(rows: Any, error: type[Exception] = IndexError) -> np.ndarray:
    """``rows`` as int64 positions; ``error`` for values of another kind (float rows would be
    truncated, 1.5 read as row 1)."""
    given = np.asarray(rows)
    if given.size and given.dtype.kind not in "iu":
        raise error(f"rows are positions (integers), not {given.dtype} values.")
    return given.astype(np.int64, copy=False)


#: The TileDB setting of every context cellsift makes: TileDB installs no signal handlers
#: of its own (SIGINT, SIGPIPE). Those pass a signal on to the handler they replaced, which
#: :func:`reclaim_signals` gives back only where the store was opened in the main thread: a
#: SOMA store first opened in another thread of a process that ignores SIGINT (a spawned
#: loader worker reading in a thread) crashed on Ctrl-C (a segfault), and with it the fit
#: (``DataLoader worker ... killed by signal``) before it could save its state.
TILEDB_NO_SIGNAL_HANDLERS = {"sm.enable_signal_handlers": "false"}


def reclaim_signals() -> None:
    """Give SIGINT and SIGPIPE back to the handlers Python has for them (in the main thread).

    TileDB installs handlers of its own for both when it first opens an array, which pass
    the signal on to the handler they replaced: where that was "ignore" (a loader worker, a
    job started in the background, SIGPIPE under Python), the signal crashed the process (a
    segfault). cellsift's own contexts ask TileDB for none (:data:`TILEDB_NO_SIGNAL_HANDLERS`);
    where another context came first (the user's), this is called after each TileDB-SOMA
    open or create; a signal is then Python's to act on, once the query in progress (one
    chunk) returns."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGINT, signal.SIGPIPE):
        handler = signal.getsignal(signum)
        if handler is not None:  # (None: not installed from Python, nothing to give back)
            signal.signal(signum, handler)


class Terminated(KeyboardInterrupt):
    """SIGTERM, ending a command as Ctrl-C does (the write in progress is removed)."""


#: Set by the command line's SIGTERM handler. The handler raises :class:`Terminated` where
#: the main thread is, but an exception raised inside a finaliser or weakref callback (an
#: HDF5 object closing) is printed and dropped: each step of a :func:`progress` loop raises
#: it again, so a command ends within a step of the signal, not when its work is done.
terminated = threading.Event()


def progress(
    iterable: Iterable[T],
    *,
    total: int | None = None,
    desc: str = "",
    enabled: bool = True,
    unit: str = "it",
) -> Iterator[T]:
    """Wrap ``iterable`` in a progress bar (tqdm.auto) when ``enabled``; each step first
    ends the loop with :class:`Terminated` after a SIGTERM (:data:`terminated`)."""
    if enabled:
        from tqdm.auto import tqdm

        iterable = tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True)
    for item in iterable:
        if terminated.is_set():
            raise Terminated
        yield item


#: Tells whether an existing path is an earlier output of the kind about to be written.
Replaceable = Callable[[Path], bool]


def is_file(path: Path) -> bool:
    """:data:`Replaceable` of single-file outputs (h5ad, png): a file, never a folder."""
    return path.is_file()


class holds:
    """:data:`Replaceable` of folder outputs: a folder holding all of ``names``; with
    ``only`` (names, or shell patterns such as ``shard-[0-9]*``), nothing else (an
    overwrite replaces the folder whole: another output saved inside it, or a user's
    notes, would go with it)."""

    def __init__(self, *names: str, only: Sequence[str] | None = None) -> None:
        self.names, self.only = names, only

    def __call__(self, path: Path) -> bool:
        held = path.is_dir() and all((path / n).exists() for n in self.names)
        return held and not self.extras(path)

    def extras(self, path: Path) -> list[str]:
        """What the folder ``path`` holds besides ``only`` (none where ``only`` is None),
        a file manager's own files apart (:data:`FILE_MANAGER_FILES`, ``._*``)."""
        if self.only is None or not path.is_dir():
            return []
        return sorted(
            n
            for n in os.listdir(path)
            if not any(fnmatch.fnmatchcase(n, pattern) for pattern in self.only)
            and not _file_managers(path / n)
        )


#: Files a file manager leaves in the folders it shows (an overwrite may take them along).
FILE_MANAGER_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})


def _file_managers(path: Path) -> bool:
    """Whether ``path`` is a file a file manager made (never a folder, nor other hidden
    files: a user's .git or .notes are theirs)."""
    name = path.name
    made = name in FILE_MANAGER_FILES or name.startswith("._")
    return made and path.is_file() and not path.is_symlink()


def refuse_inside(out: str | os.PathLike[str], **inputs: str | os.PathLike[str] | None) -> None:
    """An output inside a folder the command reads (a bundle, an index, a store; named by
    the keyword, ``the_input_store``): a :class:`~cellsift.errors.ConfigError` before the
    work, which would otherwise end by damaging it (an overwrite replaces a file there).
    An output *at* an input is judged by the kind of output it would replace."""
    from .errors import ConfigError

    target = Path(out).resolve()
    for what, path in inputs.items():
        if path is None:
            continue
        folder = Path(path).resolve()
        if folder.is_dir() and folder in target.parents:
            raise ConfigError(
                f"{out} is inside {what.replace('_', ' ')} {path}, which this command reads: "
                "write the output elsewhere."
            )


def check_replaceable(
    final: Path, overwrite: bool, replaces: Replaceable | None = None, what: str = ""
) -> None:
    """Refuse to write over ``final`` unless ``overwrite``; and with ``replaces``, unless
    ``final`` is an earlier output of the same kind (``what``) or an empty folder: an
    output path pointed by mistake at a results folder or at the inputs never deletes
    them. What overwrite would not replace is said so whether it is given or not (not as
    an overwrite to pass, then refused)."""
    if not (final.exists() or final.is_symlink()):
        return
    if replaces is None or _replaceable(final, replaces):
        if not overwrite:
            raise FileExistsError(f"{final} exists; remove it or pass overwrite=True.")
        return
    try:  # (a folder that cannot be read: none, said below as not replaceable)
        extras = replaces.extras(final) if isinstance(replaces, holds) else []
        extras = extras if isinstance(replaces, holds) and holds(*replaces.names)(final) else []
    except OSError:
        extras = []
    if extras:
        shown = ", ".join(extras[:5]) + (", ..." if len(extras) > 5 else "")
        raise FileExistsError(
            f"{final} is {what} that holds other files too ({shown}), which overwrite would "
            "delete with it: move them out first, or choose another path."
        )
    kind = "a folder" if final.is_dir() else "a file" if final.exists() else "a broken link"
    raise FileExistsError(
        f"{final} exists and is {kind} that is not {what}: overwrite replaces only {what}, "
        "never other files or folders. Choose another path, or remove it first."
    )


def _replaceable(final: Path, replaces: Replaceable) -> bool:
    """Whether ``final`` is an output ``replaces`` takes or an empty folder (one that cannot
    be read is neither)."""
    try:
        if replaces(final):
            return True
        return final.is_dir() and not final.is_symlink() and not any(final.iterdir())
    except OSError:
        return False


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    replaces: Replaceable | None = None,
    what: str = "",
) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; move it into place only if the block succeeds.

    Works for files and directories (Zarr, TileDB-SOMA). On error the temporary output is
    removed, so a failed or interrupted write never leaves a partial ``path`` behind; an
    existing ``path`` (with ``overwrite``; ``replaces`` and ``what``: see
    :func:`check_replaceable`) is replaced by :func:`move_into_place`. The block holds
    ``path``'s :func:`output_lock`: another process writing it meanwhile is refused, and the
    temporary outputs a killed write of it left are removed (:func:`temp_sibling`).
    """
    final = Path(path)
    check_replaceable(final, overwrite, replaces, what)
    make_parent(final)
    with output_lock(final, what or "a file or folder"):
        tmp = temp_sibling(final)
        try:
            yield tmp
            place_output(tmp, final, overwrite, replaces, what)  # (checked again)
        finally:
            if tmp.exists():
                remove_path(tmp)


def make_parent(path: Path) -> None:
    """Make the folders above ``path``; one of them that exists as a file is a
    :class:`ConfigError` naming it (not the system's bare "File exists"). A relative path
    whose first folder is ``~`` (or ``~user``), not there, is refused: Python does not
    expand it to the home folder, and a folder of that name would be made here."""
    head = path.parts[0] if len(path.parts) > 1 else ""  # (the first folder, if any)
    if not path.is_absolute() and head.startswith("~") and not Path(head).exists():
        raise ConfigError(
            f"{path} starts with {head!r}, which is not expanded to a home folder here: it "
            f"would make a folder named {head!r} in {Path.cwd()}. Write the path out, e.g. "
            f"{os.path.expanduser(path)}."
        )
    for folder in (path.parent, *path.parent.parents):
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                raise ConfigError(
                    f"{path}: {folder} is a file, not a folder, so nothing can be written "
                    "inside it; choose another output path."
                )
            break
    path.parent.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def atomic_dir(
    path: str | os.PathLike[str], *, overwrite: bool, replaces: holds, what: str
) -> Iterator[Path]:
    """:func:`atomic_path` for a folder output: yields the temporary folder, made; an
    existing ``path`` is replaced only if ``replaces`` tells it is ``what`` it makes."""
    with atomic_path(path, overwrite=overwrite, replaces=replaces, what=what) as tmp:
        tmp.mkdir()
        yield tmp


def _folder_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of a folder (None: absent): an output saved over it (a new folder
    renamed into place) changes it."""
    try:
        return _identity_of(os.stat(path))
    except OSError:
        return None


def _identity_of(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


#: Reads of a folder that another process keeps replacing, before giving up.
READ_ATTEMPTS = 5


def read_one_version(path: Path, read: Callable[[], T], error: Callable[[str], Exception]) -> T:
    """``read()`` of the output folder ``path`` (its files read one after another) as one
    version of it: where another process saved over the folder while it was read (an
    overwrite renames a new folder into place), the files may be of two versions, or
    look corrupt to each other; it is read again. ``error`` makes the exception for a
    folder replaced on every one of :data:`READ_ATTEMPTS` reads."""
    for _ in range(READ_ATTEMPTS):
        # the folder held open while it is read: a save that replaces it cannot give its
        # (device, inode) to a later save's folder, which would look like no change
        try:
            held: int | None = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            held = None
        try:
            # (a folder that cannot be opened as such, though its files read: Windows, or a
            # folder one may enter but not list: its identity by name, as before)
            before = _folder_identity(path) if held is None else _identity_of(os.fstat(held))
            try:
                out = read()
            except Exception:
                if before is not None and _folder_identity(path) != before:
                    continue  # (replaced meanwhile: what failed may have been the swap)
                raise
            if _folder_identity(path) == before:
                return out
        finally:
            if held is not None:
                os.close(held)
    raise error(
        f"{path} was saved over by another process each of the {READ_ATTEMPTS} times it was "
        "read: read it once the saves are done."
    )


def place_output(
    tmp: Path, final: Path, overwrite: bool, replaces: Replaceable | None = None, what: str = ""
) -> None:
    """Move the finished output ``tmp`` to ``final``, checked again as it is placed
    (:func:`check_replaceable`): what appeared there while the output was written (another
    run's output, a folder made meanwhile) is replaced only as it would have been when the
    write began. Without ``overwrite`` the move fails, in one step, where anything is there
    (Linux ``renameat2`` with ``RENAME_NOREPLACE``; elsewhere checked just before)."""
    if not overwrite and _rename(tmp, final, _RENAME_NOREPLACE):
        return
    check_replaceable(final, overwrite, replaces, what)
    move_into_place(tmp, final)


def move_into_place(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``, replacing what is there.

    A file replaces a file in one atomic rename; a folder (or a file and a folder) trade
    places in one atomic exchange (Linux ``renameat2``), and the old output, now at ``tmp``,
    is deleted. An interruption at any point leaves the old or the new output at ``final``
    (at worst with a hidden sibling holding the old one, to delete), never neither. Where
    the file system cannot exchange, the old output is renamed aside, the new one moved in
    (the old one moved back if that fails), and only then the old one deleted: a process
    killed outright between the two renames leaves the old output at the hidden
    ``.<name>.old-*`` sibling.
    """
    if not (final.exists() or final.is_symlink()) or not (tmp.is_dir() or final.is_dir()):
        os.replace(tmp, final)  # nothing there, or a file over a file
        return
    old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
    if _exchange(tmp, final):
        os.replace(tmp, old)  # (named as an old output, should the deletion not finish)
    else:
        with signals_held():  # (the two renames whole: a Ctrl-C between leaves neither)
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)
                raise
    with signals_held():  # the new output is in place: the old one goes whole, then Ctrl-C
        remove_path(old)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends, then let the first one act as it
    would have: for work that must not stop half done, such as deleting an old output the
    new one has replaced. (Handlers are the main thread's to set; elsewhere, no hold.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    before = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if got:
            signal.raise_signal(got[0])


_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Trade the places of two existing paths in one atomic step (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``); False where the system or the file system cannot."""
    return _rename(a, b, _RENAME_EXCHANGE)


def _rename(a: Path, b: Path, flags: int) -> bool:
    """Linux ``renameat2(a, b, flags)`` in one atomic step; False where the system or the
    file system cannot. ``RENAME_NOREPLACE`` where ``b`` exists: a FileExistsError."""
    if sys.platform != "linux":
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # (a C library older than glibc 2.28)
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):  # not supported
        return False
    if code == errno.EEXIST:
        raise FileExistsError(f"{b} exists; remove it or pass overwrite=True.")
    raise OSError(code, os.strerror(code), str(a), None, str(b))


#: The lock files (absolute paths) this process holds: a write that finds one of them held
#: is told that a writer of this very process is open, whatever the file's pid says.
_HELD: set[str] = set()
#: Opens of an output's lock file before giving up (it keeps vanishing as it is opened).
LOCK_ATTEMPTS = 100
#: What flock answers on a file system that keeps no locks (Lustre without -o flock, some
#: NFS, CIFS and FUSE mounts).
_NO_LOCKS = frozenset({errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF})


def _lock_file(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


def _held_key(lock: Path) -> str:
    """The lock file's place, its folder's symlinks resolved (one output by two paths)."""
    return os.path.join(os.path.realpath(lock.parent), lock.name)


def holds_output_lock(path: str | os.PathLike[str]) -> bool:
    """Whether this process holds ``path``'s :func:`output_lock`."""
    return _held_key(_lock_file(Path(path))) in _HELD


@contextlib.contextmanager
def output_lock(
    path: Path, what: str, *, resumes: bool = False, in_use: str | None = None
) -> Iterator[bool]:
    """Hold ``path``'s write lock (an exclusive ``flock`` on ``.<name>.lock`` beside it)
    for the block; a run that finds it held raises :class:`OutputInUseError` naming the
    holder's process (``what``: the command or the output, for the message; ``resumes``:
    a run of it goes on from the unfinished work of an earlier one; ``in_use``: the
    message instead, ``{holder}`` replaced by the holder's process), or saying that it is
    an earlier writer of this process. Yields whether the lock is held: then no other
    process writes ``path`` (nor its temporary outputs).

    The kernel releases the lock of a process killed outright, so a lock is never left
    held by a dead run; its file is removed as the block ends (a process that locked the
    file meanwhile sees it gone and locks the new one). The file is made as the umask
    allows (a group's members share outputs), and one that another user made and this one
    may not write is locked through a read-only descriptor. POSIX only: where ``fcntl`` is
    missing (Windows), or the file system keeps no locks, runs are not locked, and the
    block gets False."""
    try:
        import fcntl
    except ImportError:  # (Windows)
        clear_leftovers(path)  # (named only: unlocked)
        yield False
        return
    lock = _lock_file(path)
    key = _held_key(lock)
    if key in _HELD:
        raise OutputInUseError(
            f"{path} is being written by an earlier writer in this process ({what}) that "
            "was neither finished nor aborted: call its abort() (or close()), or let it go "
            "(del), then write again."
        )
    make_parent(path)
    fd: int | None = None
    try:
        with signals_held():  # (a Ctrl-C as the lock is taken: released below, not kept)
            fd = _take_lock(fcntl, lock, path, what, resumes, in_use)
            if fd is not None:
                _HELD.add(key)
        clear_leftovers(path)  # (removed where the lock is held, else named)
        if fd is None:
            yield False
            return
        with contextlib.suppress(OSError):  # (a read-only descriptor: no pid to name)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        yield True
    finally:
        if fd is not None:
            _HELD.discard(key)
            # (held: a process waiting on this file retries on the next; another user's in a
            # folder with the sticky bit, which only its owner may remove, stays)
            with contextlib.suppress(OSError):
                os.unlink(lock)
            os.close(fd)


def _take_lock(
    fcntl: Any, lock: Path, path: Path, what: str, resumes: bool, in_use: str | None
) -> int | None:
    """A descriptor of ``lock`` holding its flock; None where the file system keeps no
    locks. :class:`OutputInUseError` where another process holds it."""
    while True:
        fd, made, writable = _open_lock(lock)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if in_use is not None:
                raise OutputInUseError(in_use.replace("{holder}", holder)) from None
            if resumes:
                raise OutputInUseError(
                    f"{path} is being written by another run ({what}, process {holder}): "
                    "two runs would share its unfinished work. Wait for that run to end (or "
                    "stop it), then run this one again; it goes on from what that one "
                    "finished."
                ) from None
            raise OutputInUseError(
                f"{path} is being written by another process ({what}, process {holder}): "
                "the second write to finish would replace the first. Wait for it to end, "
                "or write to another path."
            ) from None
        except OSError as err:
            os.close(fd)
            if err.errno == errno.EBADF and not writable:  # (NFS locks only what one may write)
                raise PermissionError(
                    f"{lock}, the lock file of {path}, is another user's and cannot be locked "
                    "by this one here: if no run writes the output now, remove it (or let "
                    "its owner make it group-writable), then write again."
                ) from None
            if err.errno not in _NO_LOCKS:
                raise
            if made:  # (only its own: another client of the file system may lock it)
                with contextlib.suppress(OSError):
                    os.unlink(lock)
            logger.info("%s: not locked (the file system keeps no locks: %s)", path, err.strerror)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            return fd
        os.close(fd)  # its holder removed it as we opened it: lock the one there now


def _open_lock(lock: Path) -> tuple[int, bool, bool]:
    """A descriptor of the lock file, whether this call made it, and whether it is open for
    writing (another user's file that this one may not write is opened to read: on a local
    file system that locks too)."""
    nofollow = getattr(os, "O_NOFOLLOW", 0)  # (a link's target is no lock file of ours)
    for _ in range(LOCK_ATTEMPTS):
        try:
            return os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), True, True
        except FileExistsError:
            pass
        for flags in (os.O_RDWR, os.O_RDONLY):
            try:
                return os.open(lock, flags | nofollow), False, flags == os.O_RDWR
            except FileNotFoundError:
                break  # (removed meanwhile: tried again, below)
            except PermissionError:
                if flags == os.O_RDONLY:
                    raise
            except OSError as err:  # a link (ELOOP under O_NOFOLLOW), a folder
                if err.errno in (errno.ELOOP, errno.EISDIR):
                    raise ConfigError(
                        f"{lock}, the lock file of an output, is a "
                        f"{'link' if lock.is_symlink() else 'folder'}, not a file: remove it, "
                        "then write again."
                    ) from None
                raise
    raise ConfigError(
        f"{lock}, the lock file of an output, could not be opened {LOCK_ATTEMPTS} times: it "
        "exists, but opening it finds nothing (a link to a file that is not there?). Remove "
        "it, then write again."
    )


def _an_output_at(path: Path) -> bool:
    """Whether ``path`` holds an output: not nothing, nor a folder made empty meanwhile
    (by a script's ``mkdir -p``), nor one that cannot be listed (as if it were empty)."""
    if path.is_symlink() or path.is_file():
        return True
    try:
        return path.is_dir() and any(path.iterdir())
    except OSError:
        return False


def temporaries(folder: Path, name: str | None = None) -> list[Path]:
    """The temporary outputs in ``folder`` (of ``name``, else of any name) that writes into
    :func:`temp_sibling` paths leave when they are killed, and the replaced outputs that
    :func:`move_into_place` was deleting (``.<name>.old-*``); none where ``folder`` is not
    one."""
    if not folder.is_dir():
        return []
    named = glob.escape(name) if name is not None else "*"
    tag = "[0-9a-f]" * 8  # (as written: not a look-alike, such as another output's own)
    return sorted(p for kind in ("tmp", "old") for p in folder.glob(f".{named}.{kind}-{tag}"))


def temp_sibling(path: Path) -> Path:
    """A hidden, unique path beside ``path`` to write into before moving it into place
    (what killed writes left there: :func:`clear_leftovers`, as the lock is taken)."""
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def clear_leftovers(path: Path) -> None:
    """What killed writes of ``path`` left beside it, called by :func:`output_lock` as it
    takes the lock. Temporary outputs are what a process killed outright (by SIGKILL, the
    out-of-memory killer or a power cut) left. Where this process holds ``path``'s lock no
    other process writes them: they are removed, and so is an old output that a
    replacement moved aside (``.old-*``) once an output is at ``path``. Where nothing is at
    ``path``, that old output is the only copy (a replacement killed between its two
    renames): it is named in a warning, kept. Without the lock, all are named in a
    warning, not removed: one may be another process's write in progress."""
    stale = temporaries(path.parent, path.name)
    old = [p for p in stale if p.name.rsplit(".", 1)[1].startswith("old-")]
    if stale and holds_output_lock(path):
        placed = _an_output_at(path) if old else True
        for left in [p for p in stale if placed or p not in old]:
            logger.warning("%s: removing %s, left by a write that did not finish", path, left.name)
            remove_path(left)
        for kept in [] if placed else old:
            logger.warning(
                "%s: %s is the output this path held, moved aside by a replacement that did "
                "not finish; move it back to %s to keep it",
                path,
                kept.name,
                path.name,
            )
    elif stale:
        logger.warning(
            "%s: %d temporary output%s of an earlier write that did not finish (%s) %s beside "
            "it; remove %s once no other process writes %s",
            path,
            len(stale),
            "s" if len(stale) > 1 else "",
            ", ".join(p.name for p in stale[:3]) + (", ..." if len(stale) > 3 else ""),
            "lie" if len(stale) > 1 else "lies",
            "them" if len(stale) > 1 else "it",
            path.name,
        )


def remove_path(path: Path, attempts: int = 50) -> None:
    """Remove a file or a directory tree.

    A tree that a writer's I/O thread still fills (zarr finishing a chunk after Ctrl-C
    reached the main thread) can gain files while it is removed: the removal is retried
    until the tree is gone (``attempts`` times, 20 ms apart)."""
    if not path.is_dir() or path.is_symlink():
        path.unlink()
        return
    for attempt in range(attempts):
        try:
            shutil.rmtree(path)
            return
        except OSError:  # "directory not empty" (a file came), or a file went mid-walk
            if not path.exists():
                return
            if attempt == attempts - 1:
                raise
            time.sleep(0.02)


def in_obs_order(values: pd.Series, obs_names: pd.Index, what: str) -> Any:
    """A Series' values in obs order: as they are where its index is the obs names (also
    where they repeat) or pandas' default positions (0, 1, ..., n - 1); aligned by obs
    name where its index names the cells in another order (``adata.obs.sort_values(...)``
    then a comparison). Any other index is an error naming ``what``. Names are compared as
    text (obs names that are numbers: ``adata.obs.index`` set to integers)."""
    index, obs_names = values.index.astype(str), obs_names.astype(str)
    if index.equals(obs_names) or values.index.equals(pd.RangeIndex(len(values))):
        return values.array
    by_name = not index.has_duplicates and obs_names.isin(index).all()
    if obs_names.has_duplicates and not (by_name and index.isin(obs_names).all()):
        raise ValueError(
            f"{what} is a Series in another order than the cells, and the obs names repeat "
            f"(e.g. {obs_names[obs_names.duplicated()][0]!r}), so it cannot be aligned to the "
            f"cells by name: pass its values in obs order ({what}.to_numpy()), or make the "
            "names unique first (adata.obs_names_make_unique())."
        )
    if not by_name:
        raise ValueError(
            f"{what} is a Series whose index is not the cells' obs names: index it by "
            f"adata.obs_names, or pass its values in obs order ({what}.to_numpy())."
        )
    return pd.Series(values.to_numpy(), index=index).reindex(obs_names).array


def _refuse_names_of_several(obs_names: pd.Index, names: pd.Index, what: str) -> None:
    """A name that several cells bear selects them all only where it is given as often
    (e.g. adata.obs_names itself); given fewer times, which of them is meant is unsaid."""
    counts = obs_names.value_counts()
    repeated = counts.index[counts > 1].intersection(names)
    given = names.value_counts().reindex(repeated).to_numpy()
    repeated = repeated[given < counts[repeated].to_numpy()]
    if len(repeated):
        raise ValueError(
            f"{what}: obs names repeat, and {len(repeated)} of those given name several "
            f"cells (e.g. {repeated[0]!r}: {int(counts[repeated[0]])} cells), so names cannot "
            "tell them apart: pass a boolean mask, or make the names unique first "
            "(adata.obs_names_make_unique())."
        )


def cell_mask(adata: Any, group: Any, what: str = "cells") -> np.ndarray:
    """A boolean mask over ``adata``'s cells from a mask or obs names; an empty selection,
    a mask of the wrong length, unknown names or numbers (positions or names? the common
    ``np.flatnonzero(mask)`` read as names would select other cells) are errors naming
    ``what``. A boolean
    Series is read by its index (:func:`in_obs_order`); so is one of True and False as
    objects (a flag column after a concat); a torch tensor as its values."""
    if type(group).__module__.startswith("torch") and callable(getattr(group, "numpy", None)):
        import torch  # (a torch dtype has no kind; numpy has no bfloat16 nor sparse arrays)

        group = group.detach().cpu()
        group = group.to_dense() if group.layout != torch.strided else group
        group = group.float() if group.is_floating_point() else group
        group = group.numpy()
    dtype = getattr(group, "dtype", None)
    flags = dtype is not None and dtype.kind == "O" and len(group)
    if flags and pd.api.types.infer_dtype(group, skipna=True) == "boolean":
        missing = int(pd.isna(np.asarray(group, dtype=object)).sum())
        if missing:
            raise ValueError(
                f"{what}: the mask has {missing} missing values (None or NaN among True and "
                "False); fill them first (mask.fillna(False).astype(bool))."
            )
        group = group.astype(bool)
    is_mask = pd.api.types.is_bool_dtype(getattr(group, "dtype", None))
    if isinstance(group, pd.Series) and is_mask and len(group) == adata.n_obs:
        group = pd.Series(in_obs_order(group, adata.obs_names, what))
    if isinstance(getattr(group, "dtype", None), pd.BooleanDtype):  # a nullable mask
        missing = int(pd.isna(group).sum())
        if missing:
            raise ValueError(
                f"{what}: the mask has {missing} missing values (<NA>, e.g. from a comparison "
                "on a column with missing values); fill them first (mask.fillna(False))."
            )
        group = np.asarray(group, dtype=bool)
    arr = np.asarray(group)
    if arr.dtype == bool:
        if arr.ndim != 1 or len(arr) != adata.n_obs:
            raise ValueError(
                f"{what}: the mask has shape {arr.shape} for {adata.n_obs} cells; pass one "
                "boolean per cell (or obs names)."
            )
        mask = arr
    else:
        if arr.size and (
            arr.dtype.kind in "iuf"
            or (arr.dtype == object and all(is_number(v) for v in np.ravel(arr)))
        ):
            raise ValueError(
                f"{what} holds numbers, which could be positions or obs names: pass a "
                "boolean mask (np.isin(np.arange(adata.n_obs), positions)) or obs names "
                "(adata.obs_names[positions], or the names as text)."
            )
        names = pd.Index(np.atleast_1d(arr).astype(str))
        missing = names.difference(adata.obs_names)
        if len(missing):
            raise MissingKeyError(
                f"{what}: {len(missing)} cells are not in adata.obs_names, e.g. "
                f"{list(missing[:3])}."
            )
        mask = np.asarray(adata.obs_names.isin(names))
        if adata.obs_names.has_duplicates:  # (the counts only where names repeat)
            _refuse_names_of_several(adata.obs_names, names, what)
    if not mask.any():
        raise ValueError(f"{what} is empty: select at least one cell.")
    return mask


#: Rows read at a time from a backed AnnData's matrix.
BACKED_ROWS = 65_536


#: layer="raw" where an AnnData holds both ``adata.raw`` and a layer named "raw" (in memory
#: or in a file): what the name reads, and how to read the other.
RAW_CLASH = (
    "has both a raw (adata.raw) and a layer named 'raw', and layer='raw' names the first.",
    "To read the layer, rename it (adata.layers['counts'] = adata.layers.pop('raw')) and "
    "pass its new name.",
)


def _holds_x(adata: Any, reopen: bool = False) -> bool | None:
    """Does an AnnData hold X, without reading it: a backed one's file is asked (anndata
    opens its X to answer, which a file without one cannot), a view's parent (a view's X
    is a copy of its part). A backed file closed since is opened again where ``reopen``
    (X is to be read: anndata would), else not known (None: only a message asks)."""
    if getattr(adata, "isbacked", False):
        if not adata.file.is_open:
            if not reopen:
                return None
            adata.file.open()
        return "X" in adata.file
    if getattr(adata, "is_view", False):
        return adata._adata_ref.X is not None  # (anndata's own reference to the parent)
    return adata.X is not None


def adata_counts(
    adata: Any, layer: str | None, source: str = "adata"
) -> tuple[Any, pd.DataFrame, list[str]]:
    """Where an AnnData keeps counts: ``X`` (``layer=None``), ``layers[layer]`` or, for
    ``"raw"``, ``adata.raw`` with its own genes. Returns the matrix, its var, and the other
    places (X, quoted layer names, ``'raw'``) for messages; a place it lacks is an error that
    lists them."""
    both = adata.raw is not None and "raw" in adata.layers  # (one name, two places)
    others = [
        "layers['raw'] (rename it to read it)" if both and k == "raw" else f"'{k}'"
        for k in adata.layers.keys()
        if k != layer
    ]
    if adata.raw is not None and layer != "raw":
        others.append("'raw' (adata.raw)" if both else "'raw'")
    if layer is not None:
        held = _holds_x(adata)  # (None: a backed file closed since, not opened to word this)
        if held is not False:
            others.insert(0, "X (layer=None)" + (", if its file holds one" if held is None else ""))
    if layer == "raw" and both:
        raise DataError(f"{source} {' '.join(RAW_CLASH)}")
    has = f"this AnnData has: {', '.join(others)}" if others else "it has none"
    if layer is None and not _holds_x(adata, reopen=True):
        raise MissingKeyError(f"{source} has no X: pass layer= where the counts are ({has}).")
    in_raw = layer == "raw" and adata.raw is not None
    if layer is not None and not in_raw and layer not in adata.layers:
        raise MissingKeyError(f"{source} has no layer {layer!r} ({has}).")
    # a sparse matrix in memory checked before anything reads it (scipy's routines read a
    # damaged one out of bounds); of a view, its parent's, which the view's is sliced from
    # (the slice would drop what lies outside the genes, or crash)
    whole = adata._adata_ref if adata.is_view else adata
    check_csr(_counts_of(whole, layer, in_raw), f"{source} ({'X' if layer is None else layer})")
    return _counts_of(adata, layer, in_raw), adata.raw.var if in_raw else adata.var, others


def _counts_of(adata: Any, layer: str | None, in_raw: bool) -> Any:
    """The matrix at ``layer`` (``in_raw``: adata.raw's)."""
    if layer is None:
        return adata.X
    return adata.raw.X if in_raw else adata.layers[layer]


def csr_fault(
    indptr: np.ndarray,
    indices: np.ndarray | None,
    n_cols: int,
    first: int = 0,
    *,
    along: str = "row",
    across: str = "column",
    of: str = "genes",
) -> str | None:
    """What is wrong with a CSR matrix's structure (a file damaged on disk or in transfer),
    or None: its row pointer must start at 0 and never decrease and, with ``indices``, end
    at their number, which must lie in [0, ``n_cols``) (:func:`index_fault`). Read before
    scipy touches it: its compiled routines read out of bounds on such a matrix (a crash,
    not an error). ``first``: the number of its first row, in what messages say; ``along``,
    ``across`` and ``of`` word a CSC matrix (its columns, row indices, cells)."""
    if len(indptr) == 0:
        return f"the {along} pointer is empty"
    if indptr[0] != 0:
        return f"the {along} pointer starts at {int(indptr[0])}, not 0"
    down = np.flatnonzero(np.diff(indptr) < 0)
    if len(down):
        i = int(down[0])
        return (
            f"the {along} pointer decreases at {along} {first + i} ({int(indptr[i])}, then "
            f"{int(indptr[i + 1])})"
        )
    if indices is None:
        return None
    if indptr[-1] != len(indices):
        return f"the {along} pointer ends at {int(indptr[-1])}, but there are {len(indices)} values"
    return index_fault(indices, n_cols, across=across, of=of)


def index_fault(
    indices: np.ndarray, n_cols: int, *, across: str = "column", of: str = "genes"
) -> str | None:
    """A CSR matrix's column index outside [0, ``n_cols``), said; or None."""
    if len(indices):
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= n_cols:
            bad = low if low < 0 else high
            return f"a {across} index is {bad}, outside the {n_cols} {of}"
    return None


def check_csr(x: Any, where: str, first: int = 0) -> None:
    """A :class:`~cellsift.errors.DataError` where the sparse matrix ``x`` (counts, whose
    rows start at row ``first``) is damaged (:func:`csr_fault`): a CSR or CSC matrix, whose
    pointers and indices scipy's conversions and slices trust (other formats: nothing
    checked); ``where`` names it (e.g. ``"adata (X)"``)."""
    fmt = x.format if sp.issparse(x) else None  # (not anndata's backed datasets: read whole)
    if fmt == "csr":
        fault = csr_fault(x.indptr, x.indices, x.shape[1], first)
    elif fmt == "csc":  # (columns: its rows are its indices, numbered from first)
        fault = csr_fault(x.indptr, x.indices, x.shape[0], along="column", across="row", of="cells")
    else:
        return
    if fault is not None:
        raise DataError(
            f"{where} is corrupt: {fault}. Re-create it, or re-download the file it was read from."
        )


def canonical(x: Any) -> Any:
    """CSR ``x`` with each cell's counts of a gene in one entry (duplicates summed: a count
    split in two would be log-transformed in parts) and no stored zeros (a cell of zeros is
    empty, not counted as holding genes). ``x`` itself when it is so already, else a copy:
    the caller's matrix is never changed."""
    if x.has_canonical_format and (x.data != 0).all():
        return x
    x = x.copy()
    x.sum_duplicates()
    x.eliminate_zeros()
    return x


#: Label text that means "no label" (after stripping and ignoring case): CELLxGENE writes
#: unknown; text columns hold nan, None or <NA> where a value was missing before.
NO_LABEL = frozenset({"unknown", "nan", "none", "<na>", ""})


def no_label(values: Any) -> np.ndarray:
    """Boolean per value: missing, or text that means no label (:data:`NO_LABEL`)."""
    s = pd.Series(np.asarray(values, dtype=object))
    return (s.isna() | s.astype(str).str.strip().str.casefold().isin(NO_LABEL)).to_numpy()


def state_differences(saved: Any, here: Any, prefix: str = "", at_most: int = 2) -> list[str]:
    """How the tensors of a saved state (a checkpoint's, a file's) differ from those a model
    holds ``here``: ``name (8, 30) there, (16, 30) here``, ``name only here``, ``name only
    there`` (at most ``at_most`` of each kind, ``prefix`` before each name); empty where the
    names and shapes agree."""

    def shape(v: Any) -> tuple[int, ...] | None:
        return tuple(v.shape) if hasattr(v, "shape") else None

    def real(v: Any) -> bool | None:  # (whether it holds real numbers, not integers)
        dtype: Any = getattr(v, "dtype", None)
        if hasattr(dtype, "is_floating_point"):  # (torch's)
            return bool(dtype.is_floating_point)
        try:
            return None if dtype is None else bool(np.issubdtype(dtype, np.floating))
        except TypeError:
            return None

    shapes = [
        f"{prefix}{k} {shape(saved[k])} there, {shape(v)} here"
        for k, v in here.items()
        if k in saved and shape(saved[k]) != shape(v)
    ]
    kinds = [  # (integers for real numbers load, rounded: no such model's weights; a
        # counter saved as a real number, as a state cast to half precision whole holds it,
        # loads as it was)
        f"{prefix}{k} of {saved[k].dtype} there, {v.dtype} here"
        for k, v in here.items()
        if k in saved
        and shape(saved[k]) == shape(v)
        and real(saved[k]) is False
        and real(v) is True
    ]
    missing = [f"{prefix}{k} only here" for k in here if k not in saved]
    extra = [f"{prefix}{k} only there" for k in saved if k not in here]
    return shapes[:at_most] + kinds[:at_most] + missing[:at_most] + extra[:at_most]


def rename_apart(
    names: Iterable[str], new_name: Callable[[str], str | None], reserved: Iterable[str] = ()
) -> dict[str, str]:
    """``{name: new name}`` for the ``names`` that ``new_name`` moves (None: the name stays),
    each new name clear of ``names``, ``reserved`` and the other new names (``2``, ``3``, ...
    appended where it would not be): columns that clash with names a layout keeps for itself.
    """
    names = list(names)
    taken = set(names) | set(reserved)
    out: dict[str, str] = {}
    for name in names:
        base = new_name(name)
        if base is None:
            continue
        new, k = base, 1
        while new in taken:
            k += 1
            new = f"{base}{k}"
        taken.add(new)
        out[name] = new
    return out


def _whole_float(v: Any) -> bool:
    """A float holding a whole number exactly (finite, below 2**53)."""
    if not isinstance(v, float | np.floating):
        return False
    x = float(v)
    return math.isfinite(x) and x.is_integer() and abs(x) < 2**53


def objects_whole_as_ints(values: np.ndarray) -> np.ndarray:
    """An object array with its whole floats (below 2**53, as a collection's obs columns
    read them) as ints; the array itself where it holds no floats (a check in C)."""
    kind = pd.api.types.infer_dtype(values, skipna=True)
    if kind not in ("floating", "mixed-integer-float", "mixed", "mixed-integer"):
        return values
    whole = np.fromiter((_whole_float(v) for v in values), dtype=np.bool_, count=len(values))
    if not whole.any():
        return values
    out = values.copy()
    out[whole] = [int(v) for v in values[whole]]
    return out


def text_or_none(values: Any) -> np.ndarray:
    """``values`` as an object array of text, missing values as None (not the text "nan"
    or "None"), as categoricals and Arrow columns keep them. Dates and durations as their
    text ("2020-01-31"), not the integer nanoseconds numpy turns them into as objects."""
    if np.asarray(values).dtype.kind in "mM":
        values = np.asarray(values)
        out = np.asarray(pd.Index(values).astype(str), dtype=object)
        out[pd.isna(values)] = None
        return out
    values = np.asarray(values, dtype=object)
    missing = pd.isna(values)
    # text stays the very objects it is (a categorical's cells share its categories' text);
    # others as numpy writes them (str(1.0) is "1.0"). No fixed-width copy of the column
    other = ~(np.asarray(_IS_TEXT(values), dtype=bool) | missing)  # (0-d: a bool comes)
    out = values.copy()
    out[other] = values[other].astype(str)
    out[missing] = None
    return out


_IS_TEXT = np.frompyfunc(lambda v: type(v) is str, 1, 1)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message, without terminal codes (torch colours some);
    its type's name where it has none (a bare EOFError)."""
    lines = _ANSI.sub("", str(err)).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def error_text(err: BaseException, kind: str | None = None) -> str:
    """``err`` for a message: its type (or ``kind``, e.g. "zlib.error" for zlib's bare
    ``error``) and the first line of its message (:func:`first_line`), the type alone
    where it has none."""
    kind = kind or type(err).__name__
    said = first_line(err)
    return kind if said == type(err).__name__ else f"{kind}: {said}"


def repeated(values: Iterable[Any]) -> list[str]:
    """The values found more than once in ``values``, as text, sorted (none: empty)."""
    import collections

    return sorted(str(v) for v, n in collections.Counter(values).items() if n > 1)


def wrong_kind(what: str, kind: str, value: Any, opened: str = "") -> TypeError:
    """The TypeError of ``what`` given as ``value`` where ``kind`` belongs, naming its type;
    for a path (the usual slip), ``opened``: how the file is read into ``kind``."""
    given = type(value).__name__
    if opened and isinstance(value, str | os.PathLike):
        given += f" {os.fspath(value)!r}: {opened}"
    return TypeError(f"{what} must be {kind}, not {given}.")


def check_model_object(model: Any, what: str = "model") -> None:
    """``model`` is a model that embeds (a MetricModel); else a TypeError naming what it
    is, and, for a path (a bundle's), how a saved model is loaded."""
    if not (callable(getattr(model, "embed", None)) and hasattr(model, "genes")):
        opened = "load a saved model first, MetricModel.load(path)"
        raise wrong_kind(what, "a cellsift model (a MetricModel)", model, opened)


def model_fingerprint(model: Any) -> str:
    """A digest of what decides a model's embeddings: its architecture and normalisation
    settings, its genes (in order) and its encoder's weights. Equal exactly when those are, so
    embeddings (and the indexes built on them) name the model they came from; the loss, the
    label head and the installed Cell Ontology do not enter. Weights are taken as float32,
    the precision a saved model loads in and embeddings have: a float64 or bfloat16 model
    keeps its fingerprint through a save and a load."""
    import hashlib
    import json

    import torch

    config = {k: model.config.get(k) for k in ("architecture", "normalization")}
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    genes = getattr(model, "genes", None)
    if genes is not None:
        h.update("\t".join(map(str, getattr(genes, "genes", genes))).encode())
    encoder = getattr(model.module, "encoder", model.module)
    for name, t in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        t = t.detach().cpu().reshape(-1)
        t = (t.float() if t.is_floating_point() else t).contiguous()
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write_error(path: Path, err: BaseException) -> None:
    """Leave ``err`` at ``path`` for another process of the run to raise (:func:`read_error`):
    a rank's error about its input, which its peers see only as a process gone. Best
    effort: an error that does not pickle, or a folder that takes no file, leaves none."""
    import pickle

    with contextlib.suppress(OSError, pickle.PicklingError, TypeError, AttributeError):
        path.write_bytes(pickle.dumps(err))


def read_error(path: Path) -> BaseException | None:
    """The error another process left at ``path`` (:func:`write_error`); None if none."""
    import pickle

    try:
        err = pickle.loads(path.read_bytes())
    except (OSError, pickle.UnpicklingError, TypeError, AttributeError, EOFError):
        return None
    return err if isinstance(err, BaseException) else None
