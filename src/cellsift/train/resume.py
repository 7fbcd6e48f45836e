"""Resuming a run: the checkpoint file that a ``ckpt_path`` names, and the TensorBoard run
that wrote it, which the resumed run logs on in."""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import re
import struct
import threading
import uuid
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any, cast

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerStatus

from .._utils import (
    _lock_file,
    atomic_path,
    first_line,
    holds_output_lock,
    logger,
    output_lock,
    temporaries,
)
from .._warnings import warn
from ..data.stores import kind_of
from ..errors import DataError, OutputInUseError

__all__ = [
    "AtomicCheckpointIO",
    "checkpoint_file",
    "clear_checkpoint_leftovers",
    "continued_run",
    "hold_checkpoint_folders",
    "place_checkpoints",
    "read_checkpoint",
    "write_checkpoints_atomically",
]


#: What to do about a checkpoint that cannot be read, where a run resumes from it.
RESUME_ADVICE = "Resume from another checkpoint (a .ckpt of the run), or start anew."


def read_checkpoint(path: str | Path, advice: str = RESUME_ADVICE) -> dict[str, Any]:
    """A Lightning checkpoint file, memory-mapped (weights stay on disk until read), or a
    :class:`~cellsift.errors.DataError` in one line naming the file when it is truncated,
    corrupt or no training state (ending with ``advice``)."""
    if Path(path).is_dir():  # (a model bundle, a run's folder of checkpoints)
        what = "a model bundle" if kind_of(Path(path)) == "model" else "a folder"
        raise DataError(
            f"{path} is {what}, not a checkpoint file: resume from a .ckpt of the run (e.g. "
            "checkpoints/last.ckpt, or 'last'). A bundle's weights go on training as a new "
            "run: MetricModel.load(dir).train(...)."
        )
    if not Path(path).exists():
        raise DataError(f"{path} does not exist: there is no checkpoint there. {advice}")
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # (a file of torch's format before 1.6: read whole)
            if "mmap can only be used" not in str(err):
                raise
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not (isinstance(ckpt, dict) and "state_dict" in ckpt):
            raise RuntimeError("it holds no Lightning training state")
    # (a damaged pickle inside an intact zip fails as whatever its bytes became: text that
    # is no UTF-8, a memo or stack entry that is not there, a length past the end)
    except (
        RuntimeError,
        OSError,
        EOFError,
        pickle.UnpicklingError,
        ValueError,
        LookupError,
        TypeError,
        AttributeError,
        ArithmeticError,
        struct.error,
    ) as err:
        refused = _refused_global(err)
        if refused is not None:  # (whole, but of objects a safe read does not make)
            raise DataError(
                f"{path} holds objects that a checkpoint is not read with ({refused}): not a "
                f"checkpoint of a cellsift run, or one whose settings hold objects of other "
                f"kinds. {advice}"
            ) from err
        raise DataError(
            f"{path} cannot be read as a checkpoint ({first_line(err)}): the file "
            f"is truncated, corrupt or not a checkpoint (a model bundle's files are not). {advice}"
        ) from err
    return ckpt


def _refused_global(err: BaseException) -> str | None:
    """The class a weights-only read refused (torch names it deep in its message), or None
    where ``err`` is another error."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    # (a name that names nothing is one a damaged file cut short)
    if found is None or not _names_something(found.group(1)):
        return None
    return f"a {found.group(1)}"


def _names_something(name: str) -> bool:
    """Whether ``name`` (module.attribute, as a pickle names a class) may name an object:
    in a module already imported, one it holds (a module the file names is not imported:
    a file's names are not to run code); in another, taken to."""
    import sys

    module, _, attribute = name.rpartition(".")
    if not module:  # (no module part: a name cut short)
        return False
    held = sys.modules.get(module)
    return held is None or hasattr(held, attribute)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, but a local checkpoint is written to a temporary file
    beside it and renamed into place (:func:`~cellsift._utils.atomic_path`).

    Lightning's own writes the whole checkpoint to memory, then through fsspec to a
    temporary file in the system's temporary folder, then moves that file into place: where
    the two folders are on different file systems (a tmpfs ``/tmp``, a cluster's scratch
    disk) the move is a copy into the truncated checkpoint, so a full disk or a kill during
    it destroys the previous ``last.ckpt``, and a new checkpoint is left empty or partial
    for a resumed run to find. Here the previous file stays whole until the new one is, a
    failed write removes its temporary file (one a killed write left is removed as the
    same checkpoint is next written), and a full disk is the system's OSError (not torch's
    "unexpected pos"), naming the checkpoint. A folder is refused. Remote paths go to
    Lightning's."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        fs, local = fsspec.core.url_to_fs(str(path))
        if storage_options is not None or not isinstance(fs, LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        final = Path(local)
        if final.is_dir():  # (replaced, the folder and all in it would go)
            raise IsADirectoryError(
                errno.EISDIR,
                "a checkpoint is a file, and this path is a folder: name a .ckpt file (in it)",
                str(final),
            )
        try:
            with (
                atomic_path(final, overwrite=True, what="a checkpoint") as tmp,
                open(tmp, "wb") as f,
            ):
                _save(checkpoint, f, final)
                _to_disk(f, final)
            _folder_to_disk(final.parent)
            return
        except OutputInUseError:  # (as its lock is taken: nothing written yet)
            if holds_output_lock(final):  # (an earlier writer of this process's: its error)
                raise
        # another process writes this checkpoint (two runs in one folder of checkpoints):
        # this one is written all the same, renamed into place as that one's is, so that
        # either is whole; its leftovers are not cleared (they may be the other's write),
        # and its temporary file is named apart from those the lock's holder clears, and
        # locked itself until it is in place (:func:`clear_checkpoint_leftovers` removes
        # one it can lock: a killed write's)
        warn(
            f"another process is writing {final} (two runs sharing a folder of checkpoints "
            "overwrite each other's): give each run a folder of its own."
        )
        tmp = final.with_name(f".{final.name}.{_UNLOCKED}-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                with contextlib.suppress(ImportError, OSError):  # (Windows; no locks there)
                    import fcntl

                    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
                _save(checkpoint, f, final)
                _to_disk(f, final)
                os.replace(tmp, final)  # (still locked as it moves)
            _folder_to_disk(final.parent)
        finally:
            tmp.unlink(missing_ok=True)


#: What ``fsync`` answers on a file system that does not sync (some FUSE and network mounts).
_NO_SYNC = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})


def _to_disk(f: Any, final: Path) -> None:
    """Flush the open file ``f`` and wait until the system has it on disk, before it is
    renamed over the previous checkpoint ``final``: a rename can reach the disk before the
    data it names, and a crash of the machine (not only of the run) would then leave an
    empty or partial checkpoint where the previous one was whole. A file system that does
    not sync is written as before; a failed sync (EIO: the data did not reach the disk) is
    the system's OSError, naming ``final``."""
    try:
        f.flush()
    except OSError as err:  # (a full disk)
        raise _naming(err, final) from err
    try:
        os.fsync(f.fileno())
    except OSError as err:
        if err.errno not in _NO_SYNC:
            raise _naming(err, final) from err


def _naming(err: OSError, path: Path) -> OSError:
    """``err`` as the system's OSError naming ``path`` (one without an errno: its words and
    the path)."""
    if err.errno is None:
        return OSError(f"{err}: {path}")
    return OSError(err.errno, err.strerror, str(path))


def _folder_to_disk(folder: Path) -> None:
    """Wait until the system has ``folder``'s entries (a checkpoint's rename) on disk;
    where a folder cannot be opened so (Windows), or synced (some network file systems),
    nothing more."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


#: The temporary files of checkpoints written beside another process's lock.
_UNLOCKED = "unlocked"


def _save(checkpoint: dict[str, Any], f: Any, final: Path) -> None:
    """``torch.save`` of ``checkpoint`` into the open file ``f``; a write the system refuses
    is its OSError, naming ``final``."""
    out = _Writes(f)
    try:
        torch.save(checkpoint, cast(IO[bytes], out))
    except RuntimeError as err:  # (torch's words for a failed write of the file)
        if out.error is None:
            raise
        raise _naming(out.error, final) from err


class _Writes:
    """A file for torch.save that keeps the OSError of a write that failed: torch reports
    it as a RuntimeError of its own ("unexpected pos"), without the cause."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return int(self.f.write(data))
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.f.flush()


def write_checkpoints_atomically(trainer: Any) -> None:
    """Give ``trainer``'s strategy an :class:`AtomicCheckpointIO` where it writes through
    Lightning's default writer (a writer of the user's own, or a strategy that shards its
    checkpoints, is left as it is)."""
    strategy = trainer.strategy
    if type(getattr(strategy, "checkpoint_io", None)) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


def _local_folders(trainer: Any) -> list[str]:
    """The local folders of ``trainer``'s ``ModelCheckpoint`` callbacks, each once (however
    spelled), sorted; remote ones are not among them."""
    folders = set()
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            fs, local = fsspec.core.url_to_fs(str(cb.dirpath))
            if isinstance(fs, LocalFileSystem):
                folders.add(os.path.realpath(local))
    return sorted(folders)


def clear_checkpoint_leftovers(trainer: Any) -> None:
    """Remove what killed checkpoint writes left in the folders of ``trainer``'s
    ``ModelCheckpoint`` callbacks (hidden ``.<name>.ckpt.tmp-*`` and ``.unlocked-*``
    files, each up to a whole checkpoint), on the rank that writes them. A write's
    leftovers are cleared as the same checkpoint is next written, but most checkpoints'
    names (``best-epoch=3-step=1200``) are never written again. Those of a checkpoint that
    another process is writing are left alone."""
    if not trainer.is_global_zero:
        return
    for local in _local_folders(trainer):
        names = {p.name[1:].rsplit(".", 1)[0] for p in temporaries(Path(local))}
        for name in sorted(n for n in names if n.endswith(".ckpt")):
            # (taking the lock clears them; another process's lock: its write, kept)
            with (
                contextlib.suppress(OutputInUseError),
                output_lock(Path(local) / name, "a checkpoint"),
            ):
                pass
        for left in sorted(Path(local).glob(f".*.ckpt.{_UNLOCKED}-{'[0-9a-f]' * 8}")):
            _remove_if_unlocked(left)


#: The lock a fit holds in each of its checkpoint folders (``.cellsift-fit.lock``).
FIT_LOCK = "cellsift-fit"


def hold_checkpoint_folders(trainer: Any) -> None:
    """Refuse a fit whose checkpoint folder another fit is writing: two runs in one folder
    overwrite each other's ``last.ckpt`` (``ckpt_path="last"`` would resume whichever wrote
    last) and mix their best checkpoints. Rank 0 holds each local folder's lock (a
    ``.cellsift-fit.lock`` in it) until the fit ends, or fails (a callback added to the
    trainer's releases them; the next fit's removes it; where another callback's
    ``on_exception`` raised before it, the next fit of this process releases them). A
    killed run's lock goes with it. A folder where this user may not make the lock file is
    fitted unlocked, with a warning in the log; one holding a lock file this user may not
    open (another user's fit's) is refused."""
    for cb in [cb for cb in trainer.callbacks if isinstance(cb, _FoldersHeld)]:
        cb.release()  # (an earlier fit's, released as it ended)
        trainer.callbacks.remove(cb)
    with _HOLDING:  # (another trainer's fit of this process that has ended: one that failed
        for held in list(_HOLDERS):  # where a callback's on_exception raised before its own)
            fitter = held.fitter()
            if fitter is None or fitter.state.status != TrainerStatus.RUNNING:
                held.release()
    if not trainer.is_global_zero:
        return
    folders = _local_folders(trainer)
    if not folders:
        return
    held = _FoldersHeld(trainer)
    # (before the first lock: a refusal releases the others; last: a checkpoint saved on
    # the exception, by a callback before it, is saved while the folder is held)
    trainer.callbacks.append(held)
    for folder in folders:
        if not os.path.isdir(folder):  # (made for the lock: removed with it, where left empty)
            held.locks.callback(_remove_if_empty, folder)
        try:
            lock = output_lock(
                Path(folder) / FIT_LOCK,
                "cellsift fit",
                in_use=f"{folder} is the checkpoint folder of another fit, still running "
                "(process {holder}): two runs in one folder overwrite each other's "
                "last.ckpt, and a resume would go on from whichever wrote last. Give this "
                "run a folder of its own (ModelCheckpoint's dirpath; cellsift fit: another "
                "--trainer.logger.init_args.name or save_dir), or wait for that run to end.",
            )
            held.locks.enter_context(lock)
        except PermissionError as err:
            lock_file = _lock_file(Path(folder) / FIT_LOCK)
            if lock_file.exists():  # (another user's fit's lock, or a killed one's)
                raise OutputInUseError(
                    f"{folder} holds another user's fit lock ({lock_file.name}), which this "
                    "user may not open: if no fit runs there now, remove it (or let its "
                    "owner make it group-writable); else give this run a folder of its own."
                ) from err
            # a folder where this user may not make a file: its saves say so
            logger.warning("%s: not locked against other fits (%s)", folder, err)


#: The fits' folder locks of this process (their callbacks, while they are alive), and the
#: lock of that set and of their releases (fits of several threads).
_HOLDERS: weakref.WeakSet[_FoldersHeld] = weakref.WeakSet()
_HOLDING = threading.RLock()


def _remove_if_empty(folder: str) -> None:
    with contextlib.suppress(OSError):
        os.rmdir(folder)


class _FoldersHeld(Callback):
    """The checkpoint folders' locks of a fit (:func:`hold_checkpoint_folders`), released
    as it ends or fails (it stays in the trainer's callbacks, which Lightning is going
    through as it calls these)."""

    def __init__(self, trainer: Any) -> None:
        self.locks = contextlib.ExitStack()
        self.fitter = weakref.ref(trainer)
        with _HOLDING:
            _HOLDERS.add(self)

    def release(self) -> None:
        with _HOLDING:
            self.locks.close()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.release()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.release()


def _remove_if_unlocked(path: Path) -> None:
    """Remove the temporary file of a checkpoint written beside another process's lock
    where no process holds it locked any more (its writer was killed)."""
    try:
        import fcntl

        fd = os.open(path, os.O_RDONLY)
    except (ImportError, OSError):  # (Windows; gone meanwhile: placed)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (a writer's lock: its write, kept)
        # a live writer locks its file before the first byte: one unlocked and empty may be
        # a writer's between its opening and its lock (left: it holds nothing), and one
        # no longer at ``path`` was placed meanwhile
        if os.fstat(fd).st_size == 0 or os.stat(path).st_ino != os.fstat(fd).st_ino:
            return
        logger.warning(
            "%s: removing %s, left by a write that did not finish", path.parent, path.name
        )
        path.unlink(missing_ok=True)
    except OSError:
        pass
    finally:
        os.close(fd)


def place_checkpoints(callbacks: Iterable[Any], dirpath: str | Path) -> None:
    """Give the ``ModelCheckpoint`` callbacks that name no directory ``dirpath``, one place
    across runs. Lightning would put their checkpoints in the logger's folder of this run
    (``version_N/checkpoints``), and a resumed run, which gets a new one, would not find
    them with ``ckpt_path="last"``: it would start over (the stop on a signal says to
    resume so)."""
    for cb in callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
            cb.dirpath = os.path.realpath(dirpath)
            logger.info("ModelCheckpoint without dirpath: its checkpoints go to %s", dirpath)


def checkpoint_file(ckpt_path: str, callbacks: Iterable[Any]) -> Path | None:
    """The local file that ``ckpt_path`` names: ``"last"`` as Lightning resolves it (the
    newest ``last*.ckpt`` in the directories of the ``ModelCheckpoint`` callbacks among
    ``callbacks``), else the path itself; None where there is none."""
    if ckpt_path == "last":
        dirs = [cb.dirpath for cb in callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
        found = [f for d in dirs for f in Path(d).glob("last*.ckpt")]
        return max(found, key=lambda f: f.stat().st_mtime) if found else None
    path = Path(ckpt_path)
    return path if path.exists() else None  # (a folder: read_checkpoint names it)


def continued_run(
    ckpt_path: str | None, callbacks: Iterable[Any], save_dir: str | Path, name: str
) -> dict[str, Any] | None:
    """TensorBoardLogger options that continue the run which wrote the checkpoint: its
    ``version``, and ``purge_step`` (the checkpoint's step: what the run logged from there on
    is dropped, as the resumed run logs it again). None where the checkpoint is missing, was
    written without a TensorBoard run, or by a run of another ``save_dir`` / ``name``."""
    callbacks = list(callbacks)
    path = checkpoint_file(ckpt_path, callbacks) if ckpt_path else None
    if path is None:
        if ckpt_path == "last":  # (a job that always passes "last" starts so the first time)
            dirs = list(  # (callbacks that share a folder name it once)
                dict.fromkeys(
                    str(cb.dirpath)
                    for cb in callbacks
                    if isinstance(cb, ModelCheckpoint) and cb.dirpath is not None
                )
            )
            logger.warning(
                "ckpt_path='last': no last*.ckpt in %s, so training starts from the beginning "
                "(to resume, run where the interrupted run ran, or pass its checkpoint's path)",
                ", ".join(dirs) or "the checkpoint directory (no ModelCheckpoint callback)",
            )
        return None
    ckpt = read_checkpoint(path)  # ("last" is resolved here: checked here too)
    run = ckpt.get("cellsift_log")
    if not run or run["name"] != name:
        return None
    if Path(run["save_dir"]).resolve() != Path(save_dir).resolve():
        return None
    return {"version": run["version"], "purge_step": int(ckpt["global_step"])}
