"""Peer loaders for the throughput benchmark, each in a virtualenv of its own.

Every peer gets ``benchmarks/.venvs/<name>/`` so that its version pins never touch the
main project's environment. ``peer_python`` builds it once (reused while its stamp file
matches the spec), ``run_peer`` runs ``benchmarks/peers/<script>.py`` with it and returns the
JSON object that script prints as its last stdout line, or ``{"skipped": reason}``.

torch is always installed first as ``torch==2.13.0``: on these machines pip resolves that
spec to a local CPU wheel (``--find-links`` in the pip config), whereas any other torch
spec would pull a multi-GB CUDA build from the index. It is installed with ``--no-index``, so
a machine without that wheel fails fast instead of downloading. The peer requirements are
then installed under a constraints file pinning ``torch==2.13.0``, so no peer can upgrade or
replace it; an install that would need another torch fails with pip's resolution error.
All four peers currently resolve against torch 2.13.0 with their own pins (cellarium-ml pulls
numpy 1.26.4 and lightning 2.5.2 into its venv), so ``no_deps`` is unused; it is the route
for a peer that pins an older torch: install that one package with ``--no-deps`` and list
its other dependencies in ``requirements``.

Stdlib only, so the benchmark driver can import it from any interpreter.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENVS = HERE / ".venvs"
SCRIPTS = HERE / "peers"
TORCH = "torch==2.13.0"

# annbatch (scverse's zarr-backed loader) would be a natural peer, but every release on
# PyPI (0.0.1 .. 0.3.1) declares Requires-Python >=3.12, and these machines run Python
# 3.11.7: `pip install annbatch` answers "No matching distribution found for annbatch"
# ("Ignored the following versions that require a different python version").
ANNBATCH_SKIP_REASON = (
    "annbatch needs Python >= 3.12 (every PyPI release declares Requires-Python >=3.12); "
    "this machine runs Python 3.11, so it cannot be installed"
)
UNAVAILABLE = {"annbatch": ANNBATCH_SKIP_REASON}


class PeerUnavailable(RuntimeError):
    """A peer's virtualenv could not be built; ``str(exc)`` is a short reason."""


@dataclass(frozen=True)
class PeerSpec:
    requirements: tuple[str, ...]  # installed with the torch constraint
    # benchmarks/peers/<script>.py; not named after the package, because the script's folder
    # comes first on sys.path and a file called scdataset.py would shadow the real scdataset.
    script: str
    no_deps: tuple[str, ...] = ()  # installed afterwards with --no-deps (module docstring)


PEERS: dict[str, PeerSpec] = {
    # anndata.experimental.AnnLoader over a backed h5ad.
    "annloader": PeerSpec(("anndata==0.12.19",), "run_annloader"),
    # scDataset over a backed AnnData; only needs numpy + torch, anndata reads the file.
    "scdataset": PeerSpec(("scdataset==0.3.0", "anndata==0.12.19"), "run_scdataset"),
    # tiledbsoma-ml's ExperimentDataset over a TileDB-SOMA Experiment.
    "tiledbsoma_ml": PeerSpec(("tiledbsoma-ml==0.1.0", "tiledbsoma==2.3.0"), "run_tiledbsoma_ml"),
    # Cellarium's DistributedAnnDataCollection + IterableDistributedAnnDataCollectionDataset.
    "cellarium": PeerSpec(("cellarium-ml==0.0.15",), "run_cellarium"),
    # SCimilarity's own triplet mining + loss (run_scimilarity_mining) and the model fixture
    # (_make_scimilarity_fixture.py). It declares torch>=1.10.1, so it resolves against the
    # torch constraint as is; its zarr<3 pin stays in this venv.
    "scimilarity": PeerSpec(("scimilarity==0.4.1",), "run_scimilarity_mining"),
}


def _log_tail_reason(log: Path) -> str:
    """The last pip step's errors, plus the conflict lines of a resolution failure."""
    step = log.read_text(errors="replace").rsplit("\n$ pip install ", 1)[-1]
    lines = [ln.strip() for ln in step.splitlines() if ln.strip()]
    keep = [ln for ln in lines if ln.startswith("ERROR:") and "ResolutionImpossible" not in ln]
    if "The conflict is caused by:" in lines:
        at = lines.index("The conflict is caused by:")
        keep += [
            ln
            for ln in lines[at + 1 :]
            if ln.startswith("The user requested") or " depends on " in ln
        ]
    return " | ".join(keep or lines[-3:])[-500:] or "unknown pip failure"


def _pip(py: Path, args: list[str], log: Path, what: str) -> None:
    with log.open("a") as fh:
        fh.write(f"\n$ pip install {' '.join(args)}\n")
        fh.flush()
        proc = subprocess.run(
            [str(py), "-m", "pip", "install", "--no-input", *args],
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    if proc.returncode != 0:
        raise PeerUnavailable(f"pip install of {what} failed: {_log_tail_reason(log)}")


def peer_python(name: str) -> Path:
    """Path to the python of the peer's virtualenv, building the venv if needed."""
    if name in UNAVAILABLE:
        raise PeerUnavailable(UNAVAILABLE[name])
    if name not in PEERS:
        raise PeerUnavailable(f"unknown peer {name!r}")
    spec = PEERS[name]
    venv = VENVS / name
    py = venv / "bin" / "python"
    stamp = venv / ".install-complete"
    pins = (TORCH, spec.requirements, spec.no_deps, sys.version_info[:2])
    key = hashlib.sha256(repr(pins).encode()).hexdigest()
    VENVS.mkdir(parents=True, exist_ok=True)
    with open(VENVS / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two drivers must not build one venv at once
        if stamp.exists() and json.loads(stamp.read_text()).get("key") == key and py.exists():
            return py
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "venv", "--clear", str(venv)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise PeerUnavailable(f"venv creation failed: {proc.stderr.strip()[-300:]}")
        log = venv / "install.log"
        constraints = venv / "constraints.txt"
        constraints.write_text(TORCH + "\n")
        # The local wheel only (--no-index: pip's find-links, never the index), so a machine
        # without it fails here instead of downloading CUDA torch; then torch's small deps.
        _pip(py, ["--no-index", "--no-deps", TORCH], log, f"{TORCH} (local CPU wheel)")
        _pip(py, [TORCH], log, TORCH)
        _pip(py, ["-c", str(constraints), *spec.requirements], log, " ".join(spec.requirements))
        if spec.no_deps:
            _pip(py, ["--no-deps", *spec.no_deps], log, " ".join(spec.no_deps))
        check = subprocess.run(
            [str(py), "-c", "import torch; print(torch.__version__)"],
            capture_output=True,
            text=True,
        )
        if not check.stdout.startswith("2.13.0"):
            raise PeerUnavailable(f"torch check failed after install: {check.stdout}{check.stderr}")
        stamp.write_text(
            json.dumps({"key": key, "install_s": round(time.perf_counter() - t0, 1)}) + "\n"
        )
    return py


def _short(text: str, limit: int = 300) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else "no output")[-limit:]


def run_peer(name: str, args: list[str], timeout: float, script: str | None = None) -> dict:
    """Run a peer script (its own, or ``script`` in its venv); the last stdout line as a dict,
    or ``{"skipped": reason}``.

    The script's stderr is kept in ``benchmarks/.venvs/<name>/last_run.stderr``; a failure's
    reason is its last line (for a Python error, the exception message).
    """
    try:
        py = peer_python(name)
        proc = subprocess.run(
            [str(py), str(SCRIPTS / f"{script or PEERS[name].script}.py"), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except PeerUnavailable as exc:
        return {"skipped": str(exc)}
    except subprocess.TimeoutExpired:
        return {"skipped": f"{name} timed out after {timeout:.0f} s"}
    except Exception as exc:  # never raise: a broken peer must not stop the benchmark
        return {"skipped": f"{name} could not run: {type(exc).__name__}: {exc}"}
    (VENVS / name / "last_run.stderr").write_text(proc.stderr)  # the full story, for debugging
    if proc.returncode != 0:
        return {"skipped": f"{name} exited {proc.returncode}: {_short(proc.stderr)}"}
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"skipped": f"{name} printed no JSON: {_short(proc.stdout + proc.stderr)}"}
    if not isinstance(result, dict):
        return {"skipped": f"{name} printed JSON that is not an object"}
    return result


if __name__ == "__main__":
    # `python3 benchmarks/_peers.py NAME`: build NAME's venv if needed and print its python,
    # for scripts that run there directly (benchmarks/_make_scimilarity_fixture.py).
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {Path(__file__).name} PEER  (one of {', '.join(PEERS)})")
    try:
        print(peer_python(sys.argv[1]))
    except PeerUnavailable as exc:
        raise SystemExit(f"{sys.argv[1]}: {exc}") from None
