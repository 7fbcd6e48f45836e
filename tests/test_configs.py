"""The shipped configs build what they name."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _build(section: dict, **overrides):
    module, _, name = section["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls(**{**section["init_args"], **overrides})


def test_data_config_builds_a_datamodule(indexed_paths):
    config = yaml.safe_load((CONFIGS / "data.yaml").read_text())
    dm = _build(
        config["data"],
        source=str(indexed_paths["h5ad"]),
        num_workers=0,
        batch_size=100,
        collection_options={"min_genes": 1},
    )
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["x_ng"].shape == (100, 12) and dm.val is not None
