"""One Lightning training plan for every cellsift module.

Modules are plain ``nn.Module``s whose ``forward(batch)`` returns a dict with ``loss`` (and
any other scalars, which are logged, and ``z_nk`` embeddings, which feed the validation
silhouette). The plan owns the optimiser (AdamW), the learning-rate schedule (cosine over the
run), logging (losses, cells/s, learning rate) and the stop on a non-finite loss.

Under DDP the logged epoch values are means over every rank's batches, cells/s counts every
rank's cells, and the validation silhouette is computed on every rank's validation cells,
gathered: the values that checkpoints and early stopping read are the same on every rank
and do not depend on the number of ranks.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import nn

from .metrics import silhouette

__all__ = ["TrainingPlan"]


def _rng_state() -> dict[str, Any]:
    """The random states that training draws from: torch (CPU and CUDA), numpy, Python."""
    import random

    import numpy as np

    # the global legacy generator: what libraries and user code draw from
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)  # noqa: NPY002
    assert isinstance(keys, np.ndarray)
    state: dict[str, Any] = {  # tensors and plain values: loadable with weights_only
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


class TrainingPlan(pl.LightningModule):
    """Trains ``module`` (see the module docstring).

    Parameters
    ----------
    module
        The ``nn.Module`` to train.
    lr, weight_decay
        AdamW settings (SCimilarity: 5e-3, 0.01).
    scheduler
        ``"cosine"`` (annealed to 0 over the run's steps) or ``"none"``.
    asw_cells
        Validation cells (in the fixed validation order) used for the silhouette.
    compile
        ``torch.compile`` the module's dense parts (its ``encoder`` and ``decoder``, or the
        whole module when it has neither); state-dict keys do not change.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        lr: float = 5e-3,
        weight_decay: float = 0.01,
        scheduler: Literal["cosine", "none"] = "cosine",
        asw_cells: int = 5_000,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.module = module
        if compile:
            parts = [getattr(module, n) for n in ("encoder", "decoder") if hasattr(module, n)]
            for part in parts or [module]:
                part.compile()
        self.lr, self.weight_decay, self.scheduler, self.asw_cells = (
            lr,
            weight_decay,
            scheduler,
            asw_cells,
        )
        self._val_z: list[torch.Tensor] = []
        self._val_y: list[torch.Tensor] = []
        self._val_i: list[torch.Tensor] = []
        self._tick: float | None = None
        self._rng_to_restore: dict[str, Any] | None = None

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.module(batch)

    def _log_scalars(self, out: dict[str, Any], prefix: str, n: int) -> None:
        """Losses and counts of ``out``: per step (training; this rank's) and per epoch (the
        mean over every rank's batches, reduced once at the epoch's end)."""
        for key, value in out.items():
            if key.endswith("loss") or key.startswith("n_"):
                scalar = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
                if prefix == "train":
                    self.log(
                        f"{prefix}/{key}_step",
                        scalar,
                        batch_size=n,
                        prog_bar=key == "loss",
                        on_step=True,
                        on_epoch=False,
                    )
                name = f"{prefix}/{key}_epoch" if prefix == "train" else f"{prefix}/{key}"
                self.log(
                    name,
                    scalar,
                    batch_size=n,
                    prog_bar=key == "loss" and prefix != "train",
                    on_step=False,
                    on_epoch=True,
                    sync_dist=True,
                )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.module(batch)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the loss is {float(loss.detach())} at step {self.global_step} (epoch "
                f"{self.current_epoch}, batch {batch_idx}); training stops. Lower the learning "
                "rate, or check the data for values that are not counts."
            )
        n = int(batch["x_ng"].shape[0])
        self._log_scalars(out, "train", n)
        now = time.perf_counter()
        if self._tick is not None:  # every rank's cells (ranks take equal batches)
            world = self.trainer.world_size if self._trainer is not None else 1
            self.log("train/cells_per_s", n * world / max(now - self._tick, 1e-9), batch_size=n)
        self._tick = now
        if self.trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=n)
        return loss

    def on_train_epoch_start(self) -> None:
        self._tick = None

    # -- random state: a resumed run draws what the uninterrupted run would have drawn --------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # every rank's states (each rank draws its own stream), gathered: every rank builds
        # the checkpoint, rank 0 writes it
        import torch.distributed as dist

        states = [_rng_state()]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, states[0])
            states = gathered
        checkpoint["cellsift_rng"] = {"per_rank": states}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("cellsift_rng", {}).get("per_rank", [])
        if states:
            rank = self.trainer.global_rank if self._trainer is not None else 0
            self._rng_to_restore = states[rank % len(states)]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # restored here, not on load: between the two, Lightning starts the data loader's
        # iterator (one draw) and may validate (triplet mining draws), which the uninterrupted
        # run did not do at this point
        if self._rng_to_restore is not None:
            _set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self.module(batch)
        self._log_scalars(out, "val", int(batch["x_ng"].shape[0]))
        if "z_nk" in out and "y_n" in batch and sum(len(z) for z in self._val_z) < self.asw_cells:
            self._val_z.append(out["z_nk"].detach())
            self._val_y.append(batch["y_n"].detach())
            idx = batch.get("obs_idx_n")
            self._val_i.append(
                idx.detach() if idx is not None else torch.full_like(batch["y_n"], -1)
            )

    def on_validation_epoch_end(self) -> None:
        """The silhouette of the first ``asw_cells`` validation cells (by cell index), the
        same set on any number of ranks: every rank's cells are gathered first."""
        z, y, idx = self._gathered_validation()
        self._val_z, self._val_y, self._val_i = [], [], []
        if z is None:
            return
        if bool((idx >= 0).all()):
            order = torch.argsort(idx)
            z, y = z[order], y[order]
        z, y = z[: self.asw_cells], y[: self.asw_cells]
        related = getattr(getattr(self.module, "triplet", None), "related_ll", None)
        if len(torch.unique(y[y >= 0])) >= 2:
            # the same value on every rank; synced so that Lightning knows it is global
            self.log("val/asw", float(silhouette(z, y, related)), sync_dist=True)

    def _gathered_validation(
        self,
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """This epoch's validation embeddings, labels and cell indices, of every rank."""
        local = (
            (torch.cat(self._val_z), torch.cat(self._val_y), torch.cat(self._val_i))
            if self._val_z
            else None
        )
        world = self.trainer.world_size if self._trainer is not None else 1
        if world == 1:
            return local if local is not None else (None, torch.empty(0), torch.empty(0))
        # ranks may hold different numbers of cells (or none): pad to the largest, gather
        n, d = (len(local[0]), local[0].shape[1]) if local is not None else (0, 0)
        sizes = self._all_gather(torch.tensor([n, d], device=self.device)).reshape(-1, 2)
        n_max, d = int(sizes[:, 0].max()), int(sizes[:, 1].max())
        if n_max == 0:
            return None, torch.empty(0), torch.empty(0)
        z = torch.zeros(n_max, d, device=self.device)
        y = torch.full((n_max,), -1, dtype=torch.long, device=self.device)
        idx = torch.full((n_max,), -1, dtype=torch.long, device=self.device)
        if local is not None:
            z[:n], y[:n], idx[:n] = local[0], local[1].long(), local[2].long()
        z, y, idx = (self._all_gather(t) for t in (z, y, idx))
        keep = torch.cat([torch.arange(n_max, device=self.device) < k for k in sizes[:, 0]])
        return z.flatten(0, 1)[keep], y.flatten(0, 1)[keep], idx.flatten(0, 1)[keep]

    @staticmethod
    def _all_gather(t: torch.Tensor) -> torch.Tensor:
        """``t`` of every rank, stacked (world x ...)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return t[None]
        out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(out, t.contiguous())
        return torch.stack(out)

    def configure_optimizers(self) -> Any:
        params = list(self.module.parameters())
        # torch's fused AdamW (one kernel over all parameters) runs on CPUs and CUDA GPUs: on
        # the CPU it steps SCimilarity's model about 10x faster than the per-tensor loop
        fused = {p.device.type for p in params} <= {"cpu", "cuda"}
        opt = torch.optim.AdamW(
            params, lr=self.lr, weight_decay=self.weight_decay, fused=True if fused else None
        )
        if self.scheduler == "none":
            return opt
        steps = max(int(self.trainer.estimated_stepping_batches), 1)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
