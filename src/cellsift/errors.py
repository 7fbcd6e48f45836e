"""Exceptions raised by cellsift. Every message says what is wrong and how to fix it."""

from __future__ import annotations

__all__ = [
    "USER_ERRORS",
    "CellsiftError",
    "ConfigError",
    "DataError",
    "GeneAlignmentError",
    "MissingDependencyError",
    "MissingKeyError",
    "OutputInUseError",
    "ProcessDiedError",
    "ResumeError",
    "TrainingError",
    "TrainingInterrupted",
]


#: How cells without counts are dropped, in the Python API's terms (the command line
#: says its own option in its place).
MIN_GENES_FIX = (
    "min_genes=1 (CellCollection(..., min_genes=1), which MetricModel.from_collection takes; "
    "CellDataModule(..., collection_options={'min_genes': 1}), which MetricModel.train "
    "takes) or `cellsift convert --min-genes 1`"
)


class CellsiftError(Exception):
    """Base class of cellsift's errors."""


class DataError(CellsiftError, ValueError):
    """A store or its contents cannot be used as they are (corrupt, not counts, ...)."""


class GeneAlignmentError(DataError):
    """A store's genes do not match the gene vocabulary well enough."""


class ResumeError(CellsiftError, ValueError):
    """A saved loader state does not fit the loader it is loaded into."""


class ConfigError(CellsiftError, ValueError):
    """Settings that cannot work together (a callback watching a metric that no step logs)."""


class MissingKeyError(CellsiftError, KeyError):
    """A column, layer or key that the caller named is not there (the message lists what is)."""

    def __str__(self) -> str:  # the message as written, not KeyError's quoted repr
        return str(self.args[0]) if self.args else ""


class MissingDependencyError(CellsiftError, ImportError):
    """An optional package a feature needs is not installed (the message names the extra)."""


class OutputInUseError(CellsiftError, RuntimeError):
    """Another process is writing the same output (the message names it): two runs would
    share its staging folder and undo each other's work."""


class ProcessDiedError(CellsiftError, RuntimeError):
    """A process of a multi-process run ended without an error of its own (killed by a
    signal: out of memory, a scheduler); what the run finished is kept to resume from."""


class TrainingError(CellsiftError, FloatingPointError):
    """Training cannot go on (a loss that is NaN or infinite); the message names the step."""


class TrainingInterrupted(CellsiftError):
    """Training stopped on a signal (SIGTERM from a scheduler or ``kill``, SIGINT from
    Ctrl-C) at the end of a step, with the run's state saved in ``checkpoint``: a run resumed
    from it goes on as the uninterrupted run would have. ``signal``: the signal's number
    (None where another DDP rank received it); ``checkpoint`` None: no state was kept."""

    def __init__(
        self, message: str, *, checkpoint: str | None, step: int, signal: int | None
    ) -> None:
        super().__init__(message)
        self.checkpoint, self.step, self.signal = checkpoint, step, signal

    @property
    def exit_status(self) -> int:
        """The shell's status for a process ended by the signal: 128 + its number."""
        return 128 + (self.signal if self.signal is not None else 15)


#: Errors about the user's input, settings or files: every command says them in one line
#: (exit status 2), and a process of several says one process's as its own.
USER_ERRORS: tuple[type[Exception], ...] = (CellsiftError, FileNotFoundError, FileExistsError)
