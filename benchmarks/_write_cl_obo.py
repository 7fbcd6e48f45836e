"""Write a minimal OBO 1.2 Cell Ontology from cellxgene-ontology-guide's packaged CL data.

SCimilarity reads the ontology with ``obonet.read_obo`` (an ``is_a`` graph keyed by term id,
``name`` per node, ``is_obsolete: true`` terms dropped), so each term gets ``id:``, ``name:``,
its parents as ``is_a:`` and, when deprecated, ``is_obsolete: true``. The packaged ancestors
follow is_a and part_of alike, through terms of other ontologies too (a few CL terms reach
``cell`` only through GO terms), so a term's parents are its CL ancestors that are no
ancestor of another of them (the transitive reduction within CL): ancestor/descendant sets
within CL, all SCimilarity asks of the graph, are unchanged.

Usage: ``python benchmarks/_write_cl_obo.py OUT.obo`` (needs cellxgene-ontology-guide and
zstandard installed, e.g. the project's .venv).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import zstandard


def newest_cl_file() -> Path:
    spec = importlib.util.find_spec("cellxgene_ontology_guide")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("cellxgene-ontology-guide is not installed in this interpreter")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    files = sorted(data.glob("CL-ontology-v*.json.zst"))  # vYYYY-MM-DD: sorts by date
    if not files:
        raise SystemExit(f"no CL-ontology-v*.json.zst under {data}")
    return files[-1]


def _parents(term_id: str, terms: dict[str, dict]) -> list[str]:
    """The term's CL ancestors that are no ancestor of another of them: their is_a closure
    is its CL ancestors (a distance-1 ancestor outside CL would be a node of no name)."""
    ancestors = {a for a in terms[term_id].get("ancestors", {}) if a in terms and a != term_id}
    return sorted(
        a
        for a in ancestors
        if not any(a in terms[b].get("ancestors", {}) for b in ancestors if b != a)
    )


def obo_text(terms: dict[str, dict], version: str) -> str:
    release = version.removeprefix("v")
    lines = ["format-version: 1.2", f"data-version: cl/releases/{release}", "ontology: cl", ""]
    for term_id in sorted(terms):
        term = terms[term_id]
        name = " ".join(str(term["label"]).split())  # one line, no stray whitespace
        lines += ["[Term]", f"id: {term_id}", f"name: {name}"]
        parents = _parents(term_id, terms)
        lines += [f"is_a: {p}" for p in parents]
        if term.get("deprecated"):
            lines.append("is_obsolete: true")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: _write_cl_obo.py OUT.obo")
    src = newest_cl_file()
    with src.open("rb") as fh:
        terms = json.loads(zstandard.ZstdDecompressor().stream_reader(fh).read())
    version = src.name.removeprefix("CL-ontology-").removesuffix(".json.zst")
    out = Path(argv[0])
    out.write_text(obo_text(terms, version), encoding="utf-8")
    print(f"wrote {len(terms)} terms of CL {version} to {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
