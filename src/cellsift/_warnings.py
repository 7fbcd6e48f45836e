"""Warnings raised by cellsift, and the one helper that emits them."""

from __future__ import annotations

import logging
import warnings

__all__ = ["CellsiftWarning", "NotCountsWarning", "UntrainedDecoderWarning", "warn"]


class CellsiftWarning(UserWarning):
    """Base class of every warning cellsift emits."""


class NotCountsWarning(CellsiftWarning):
    """The data look normalised or log-transformed where raw counts are expected."""


class UntrainedDecoderWarning(CellsiftWarning):
    """A model loaded without decoder weights: it embeds as trained, but its decoder is random."""


def warn(
    message: str, category: type[CellsiftWarning] = CellsiftWarning, stacklevel: int = 2
) -> None:
    """Emit ``message`` as a cellsift warning, attributed to the caller's caller."""
    warnings.warn(message, category, stacklevel=stacklevel + 1)


# torch reports every sparse CSR tensor as "beta" and that invariant checks are off: we build
# CSR tensors from validated stores on every batch, so these say nothing to our users.
warnings.filterwarnings(
    "ignore", message="Sparse CSR tensor support is in beta", category=UserWarning
)
warnings.filterwarnings(
    "ignore", message="Sparse invariant checks are implicitly disabled", category=UserWarning
)
# Lightning warns about any IterableDataset with __len__ under several workers; ours shard the
# epoch by rank and worker and report the length of the shard, which is what it asks for.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
# A data module without validation cells (val_fraction=0) returns no validation loader: an
# empty list, which Lightning then asks about ("Please make sure this was your intention").
warnings.filterwarnings("ignore", message="Total length of `list` across ranks is zero")
# Lightning builds torch's LeafSpec, which torch now deprecates: a note to Lightning's authors,
# printed on every training run of ours.
warnings.filterwarnings(
    "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
)


class _DropAdvert(logging.Filter):
    """Lightning advertises a cloud logger ("💡 Tip: ... litlogger") at every Trainer it
    builds: every training run of ours and every run of ``cellsift fit``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_name).addFilter(_DropAdvert())
