"""The compiled kernels are found again in numba's cache by the next process: it compiles
nothing and adds nothing (a kernel whose cache key differs per process would compile anew in
every process and grow the cache without end)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numba
import pytest

import cellsift

SCRIPT = """
import cellsift._numba
cellsift._numba.NOTICE_AFTER = 2.5  # (above a load from the cache, below a compile)
import numpy as np
import scipy.sparse as sp
import torch

from cellsift.data._values import first_fault
from cellsift.losses import mine_triplets
from cellsift.nn._sparse_cpu import csr_linear
from cellsift.transforms import Densify, Log1p, NormalizeTotal

for dtype in (np.float32, np.float64):
    first_fault(np.array([1, 0, 2.5], dtype=dtype))
z = torch.nn.functional.normalize(torch.randn(40, 8), dim=1)
y = torch.arange(40) % 4
for mode in ("semihard", "hardest"):
    mine_triplets(z, y, study_n=torch.arange(40) % 2, negative=mode)
x = sp.random(16, 30, density=0.3, format="csr", dtype=np.float32, random_state=0)
t = torch.sparse_csr_tensor(
    torch.from_numpy(x.indptr).long(), torch.from_numpy(x.indices).long(),
    torch.from_numpy(x.data), size=x.shape,
)
w = torch.randn(5, 30, requires_grad=True)
csr_linear(t, w, None, np.ascontiguousarray(w.detach().numpy().T)).sum().backward()
Densify().transform(Log1p().transform(NormalizeTotal().transform(t)))
"""


@pytest.mark.slow
@pytest.mark.skipif(numba.config.DISABLE_JIT, reason="numba compiles nothing (NUMBA_DISABLE_JIT)")
def test_a_second_process_compiles_nothing_new(tmp_path):
    cache = tmp_path / "numba-cache"
    src = str(Path(cellsift.__file__).resolve().parents[1])  # (the checkout under test)
    path = os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "PYTHONPATH": path}

    said = []

    def run() -> dict[str, int]:
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT],
            env=env,
            check=True,
            timeout=600,
            capture_output=True,
            text=True,
        )
        said.append(done.stderr)
        return {str(p.relative_to(cache)): p.stat().st_size for p in cache.rglob("*.nb*")}

    first = run()
    assert any(name.endswith(".nbc") for name in first)  # (the kernels were cached at all)
    assert run() == first
    # the first run's wait, compiling the mining kernel, was said (hunt196: half a minute
    # of silence as a first fit began); the second, from the cache, says nothing
    note = "cellsift: compiling the triplet mining kernel (on the first run of this"
    assert note in said[0] and "compiling" not in said[1]


def test_a_kernel_numba_cannot_cache_is_compiled_in_each_process(monkeypatch, caplog):
    """Where numba finds no folder it may write its cache to (a read-only install and
    home), it refuses cache=True as the kernel is defined: the kernel is compiled without
    its cache instead (same results), said once; other errors still raise."""
    import logging

    from cellsift import _numba

    real = numba.njit

    def no_locator(*args, cache=False, **options):
        if cache:
            raise RuntimeError("cannot cache function 'f': no locator available for file 'x'")
        return real(*args, **options)

    monkeypatch.setattr(numba, "njit", no_locator)
    monkeypatch.setattr(_numba, "_said", [])

    def twice(x):
        return 2 * x

    with caplog.at_level(logging.INFO, logger="cellsift"):
        kernels = [_numba.njit_cached(nogil=True)(twice) for _ in range(2)]
    assert [k(21) for k in kernels] == [42, 42]
    assert sum("cannot cache its compiled kernels" in r.message for r in caplog.records) == 1

    def broken(*args, **options):
        raise RuntimeError("something else")

    monkeypatch.setattr(numba, "njit", broken)
    with pytest.raises(RuntimeError, match="something else"):
        _numba.njit_cached()(twice)
