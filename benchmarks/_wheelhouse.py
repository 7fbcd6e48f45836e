"""Wheels of cellsift's runtime dependencies, for a machine without network access.

    python benchmarks/_wheelhouse.py DIR [--python-version 3.12] [--have FILE] [--cl-only]

Resolves cellsift's dependencies from this environment's installed versions (cellsift's own
requirements and theirs, extras left out but jsonargparse's ``signatures``), and those of
what ``benchmarks/gpu_check.sh``'s device tests run with (:data:`TEST_ROOTS`), and downloads
manylinux x86-64 wheels of those versions for the target Python into DIR. ``--have``: a
file of distribution names the target already has (one per line or space-separated, e.g.
from ``pip list``), left out. ``--cl-only``: cellxgene-ontology-guide is re-packed with the
Cell Ontology files alone (cellsift reads nothing else of it; the full wheel is ~100 MB).
On the target: ``pip install --no-index --no-deps --target SITE DIR/*.whl`` and put SITE
and cellsift's ``src`` on PYTHONPATH (``benchmarks/gpu_check.sh`` does this).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata as md
import re
import subprocess
import sys
import zipfile
from pathlib import Path

PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]
# what a GPU machine's framework image brings (the wheels would be large or CUDA-specific)
ALWAYS_PRESENT = {"torch", "triton", "numpy"}
# what the device tests need besides cellsift's own requirements: the test runner, and the
# independent reference of tests/test_devices.py's label calls
TEST_ROOTS = ("pytest", "scikit-learn")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_closure(root: str = "cellsift", *others: str) -> dict[str, str]:
    """Installed distributions that ``root`` needs, transitively, with their versions; and
    the ``others`` with what they need."""
    seen: dict[str, str] = {}
    todo = [root, *others]
    while todo:
        name = _norm(todo.pop())
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            if name in map(_norm, (root, *others)):  # (not a requirement's optional part)
                raise SystemExit(
                    f"{name} is not installed here: install it to resolve it"
                ) from None
            continue
        seen[name] = dist.version
        for req in dist.requires or []:
            if "extra ==" in req and not (name == "jsonargparse" and "signatures" in req):
                continue
            todo.append(re.split(r"[ ;<>=!\[~(]", req, maxsplit=1)[0])
    seen.pop(_norm(root), None)
    return seen


def _cl_only(wheel: Path) -> None:
    """Re-pack cellxgene-ontology-guide with its code and the Cell Ontology files only (and
    a RECORD of what it keeps)."""
    keep = re.compile(r"(\.py$|\.dist-info/(?!RECORD$)|/data/CL-ontology-.*\.json\.zst$)")
    tmp = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        record, record_name = [], ""
        for info in src.infolist():
            if info.filename.endswith(".dist-info/RECORD"):
                record_name = info.filename
            elif keep.search(info.filename):
                data = src.read(info)
                dst.writestr(info, data)
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
                record.append(f"{info.filename},sha256={digest.decode()},{len(data)}")
        record.append(f"{record_name},,")
        dst.writestr(record_name, "\n".join(record) + "\n")
    tmp.replace(wheel)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--python-version", default="3.12")
    ap.add_argument("--have", type=Path, help="distribution names the target already has")
    ap.add_argument("--cl-only", action="store_true")
    args = ap.parse_args()
    have = set(ALWAYS_PRESENT)
    if args.have:
        have |= {_norm(w) for w in re.split(r"[\s,]+", args.have.read_text()) if w}
    closure = requirement_closure("cellsift", *TEST_ROOTS)
    wanted = {n: v for n, v in closure.items() if n not in have}
    args.dir.mkdir(parents=True, exist_ok=True)
    platforms = [x for p in PLATFORMS for x in ("--platform", p)]
    pins = [f"{name}=={version}" for name, version in sorted(wanted.items())]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps"]
    cmd += ["--only-binary=:all:", "--python-version", args.python_version]
    cmd += ["--implementation", "cp", *platforms, "-d", str(args.dir), *pins]
    subprocess.run(cmd, check=True)  # one resolver run for them all
    print("\n".join(pins), flush=True)
    if args.cl_only:
        for wheel in args.dir.glob("cellxgene_ontology_guide-*.whl"):
            _cl_only(wheel)
    size = sum(f.stat().st_size for f in args.dir.glob("*.whl"))
    print(f"{len(wanted)} wheels, {size / 2**20:.1f} MiB in {args.dir}")


if __name__ == "__main__":
    main()
