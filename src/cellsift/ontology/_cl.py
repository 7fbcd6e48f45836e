"""Cell Ontology snapshot from the ``cellxgene-ontology-guide`` package (no network).

Each term carries its label, synonyms, ancestors (is_a and part_of, with distances) and
deprecation. :class:`CellOntology` answers id <-> name, ancestors and descendants, builds
boolean closure matrices over a label set (what the triplet miner uses to keep ontology
relatives from being negatives), maps user labels onto CL ids (:meth:`harmonize`) and merges
labels seen in too few studies into a viable parent (:meth:`coarsen_rare`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

import numpy as np
import pandas as pd

from .._utils import no_label
from ..errors import CellsiftError

__all__ = ["CellOntology", "CoarsenReport", "load_cell_ontology"]

_FILE = re.compile(r"^CL-ontology-v(\d{4}-\d{2}-\d{2})\.json\.zst$")
#: CL ids as written in other places: any case, "_" for ":", an OBO PURL
_CL_ID = re.compile(r"^(?:https?://purl\.obolibrary\.org/obo/)?CL[:_](\d{7})$", re.IGNORECASE)


class OntologyError(CellsiftError, ValueError):
    """Labels that cannot be mapped onto the Cell Ontology."""


def available_versions() -> list[str]:
    """CL releases shipped with ``cellxgene-ontology-guide``, oldest first."""
    folder = resources.files("cellxgene_ontology_guide") / "data"
    return sorted(m.group(1) for f in folder.iterdir() if (m := _FILE.match(f.name)))


@cache
def _load(version: str) -> dict[str, dict[str, Any]]:
    import zstandard

    path = resources.files("cellxgene_ontology_guide") / "data" / f"CL-ontology-v{version}.json.zst"
    raw = zstandard.ZstdDecompressor().decompress(path.read_bytes(), max_output_size=1 << 30)
    return json.loads(raw)


def load_cell_ontology(version: str | None = None) -> CellOntology:
    """The Cell Ontology of release ``version`` (``YYYY-MM-DD``; default: the newest shipped)."""
    versions = available_versions()
    if not versions:
        raise OntologyError("cellxgene-ontology-guide ships no Cell Ontology; reinstall it.")
    version = versions[-1] if version is None else version
    if version not in versions:
        raise OntologyError(f"Cell Ontology {version!r} is not shipped; available: {versions}.")
    return CellOntology(_load(version), version)


@dataclass
class CoarsenReport:
    """What :meth:`CellOntology.coarsen_rare` did: label -> parent, and labels dropped."""

    moved: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)  # label -> cells dropped
    studies: dict[str, int] = field(default_factory=dict)  # label -> studies it was seen in

    def __str__(self) -> str:
        lines = [f"{a} -> {b} ({self.studies.get(a, 0)} studies)" for a, b in self.moved.items()]
        lines += [
            f"{a} dropped ({n} cells, {self.studies.get(a, 0)} studies; no viable parent)"
            for a, n in self.dropped.items()
        ]
        return "\n".join(lines) or "nothing to coarsen"


def _count(values: Sequence[str], one: str, many: str) -> str:
    """'1 label is ONE' / 'N labels are MANY'."""
    return f"1 label is {one}" if len(values) == 1 else f"{len(values)} labels are {many}"


def _studies_as_values(studies: list[Any]) -> np.ndarray:
    """One object per cell (np.array would read tuples, or lists, as a second axis): a
    tuple of values (donor, batch) as its values' texts, each read as a single study is
    ((1.0, "b") is (1, "b")), or None where every one is missing; all read at once."""
    from ..data.collection import _as_text  # (not at import: data imports this lazily)

    held = np.empty(len(studies), dtype=object)
    parts: list[Any] = []
    spans = []
    for i, st in enumerate(studies):
        if isinstance(st, np.ndarray) and st.ndim == 0:
            st = st.item()
        if isinstance(st, tuple | list | np.ndarray):
            values = [str(v) if isinstance(v, tuple | list | np.ndarray) else v for v in st]
            spans.append((i, len(parts), len(parts) + len(values)))
            parts.extend(values)
        else:
            held[i] = st
    if spans:
        flat = np.empty(len(parts), dtype=object)
        flat[:] = parts
        none = no_label(flat).tolist() if parts else []
        texts = [
            "" if missing else str(t)  # (a value that spells none: as None, "")
            for t, missing in zip(_as_text(flat) if parts else [], none, strict=True)
        ]
        # (each value after a NUL, which no text of a study holds: no tuple meets another,
        # nor a single study; Python's lists: a numpy slice a cell would take longer)
        for i, lo, hi in spans:
            whole = lo == hi or all(none[lo:hi])
            held[i] = None if whole else "".join("\x00" + t for t in texts[lo:hi])
    return held


def _listing(values: Sequence[str], at_most: int = 20) -> str:
    """'a', 'b', ... and N more."""
    more = f" and {len(values) - at_most} more" if len(values) > at_most else ""
    shown = (
        "a missing value (NaN/None/NA)" if _missing(v) else repr(str(v)) for v in values[:at_most]
    )
    return ", ".join(shown) + more


def _spaced(text: str) -> str:
    """``text`` with the spaces around it dropped and each run within it (tabs,
    non-breaking spaces) one space: how names are compared."""
    return " ".join(text.split())


def _missing(value: Any) -> bool:
    """None, NaN or pandas' NA (whose comparisons are neither True nor False)."""
    return value is None or (not isinstance(value, str) and bool(pd.isna(value)))


def _one_label(value: Any, method: str) -> Any:
    """``value``, one label for ``method``: None where it is missing (None, NaN, NA); a
    TypeError for several (a list, an array, a Series), which harmonize() maps."""
    value = _key(value)  # (one value in a 0-d array: it)
    if isinstance(value, str):
        return value
    if not pd.api.types.is_scalar(value):
        raise TypeError(
            f"{method} reads one label, not {_described(value)}; for a list of labels, "
            "harmonize(labels)."
        )
    return None if _missing(value) else value


def _key(term: Any) -> Any:
    """A term given to a lookup as the key of :attr:`CellOntology.terms`: one in a 0-d
    array as the value it holds; others as given (checked by the lookup)."""
    return term.item() if isinstance(term, np.ndarray) and term.ndim == 0 else term


def _described(value: Any) -> str:
    """``value`` in a message: its type and, for one value, the value; for several (a
    list, a Series), how many."""
    kind = type(value).__name__
    if pd.api.types.is_scalar(value):
        return f"{kind} {value!r}"
    try:
        return f"a {kind} of {len(value)} values"
    except TypeError:
        return f"a {kind}"


class CellOntology:
    """Cell Ontology terms (use :func:`load_cell_ontology`)."""

    def __init__(self, terms: dict[str, dict[str, Any]], version: str) -> None:
        self.terms = {k: v for k, v in terms.items() if k.startswith("CL:")}
        self.version = version
        self._by_label: dict[str, str] = {}
        self._by_folded: dict[str, str] = {}
        self._by_synonym: dict[str, str] = {}
        #: names of deprecated terms, "obsolete " stripped (older data name them so): read
        #: only where no current term has the name
        self._by_obsolete: dict[str, str] = {}
        #: synonyms of deprecated terms: read only where no name above matches
        self._by_obsolete_synonym: dict[str, str] = {}
        for term, info in self.terms.items():
            # (several deprecated terms have an empty label: a blank value names no term)
            if info.get("deprecated"):
                name = _spaced(info["label"].casefold().removeprefix("obsolete "))
                if name:
                    self._by_obsolete.setdefault(name, term)
                for syn in info.get("synonyms", []):
                    if syn.strip():
                        self._by_obsolete_synonym.setdefault(_spaced(syn.casefold()), term)
                continue
            if info["label"].strip():
                self._by_label.setdefault(_spaced(info["label"]), term)
                self._by_folded.setdefault(_spaced(info["label"].casefold()), term)
            for syn in info.get("synonyms", []):
                if syn.strip():
                    self._by_synonym.setdefault(_spaced(syn.casefold()), term)
        self._children: dict[str, set[str]] | None = None

    def __repr__(self) -> str:
        return f"CellOntology(CL {self.version}, {len(self.terms)} terms)"

    def __contains__(self, term: object) -> bool:
        return term in self.terms

    # -- terms ----------------------------------------------------------------------------
    def name(self, term: str) -> str:
        """The label of ``term``."""
        return self._term(_key(term))["label"]

    def names(self, terms: Iterable[str]) -> list[str]:
        return [self.name(t) for t in terms]

    def id(self, name: str) -> str | None:
        """The id of a label (exact, then ignoring case, then synonyms; spaces around it
        ignored and runs of them, tabs or non-breaking spaces within it read as one space,
        as :meth:`harmonize` reads them); None if unknown or missing (None, NaN)."""
        if not isinstance(name, str):
            if pd.api.types.is_scalar(name) and _missing(name):
                return None
            raise TypeError(
                f"id() reads one label (text), not {_described(name)}; for a list of labels, "
                "harmonize(labels)."
            )
        name = _spaced(name)
        return (
            self._by_label.get(name)
            or self._by_folded.get(name.casefold())
            or self._by_synonym.get(name.casefold())
        )

    def is_deprecated(self, term: str) -> bool:
        return bool(self._term(_key(term)).get("deprecated"))

    def replacement(self, term: str) -> str | None:
        """The current CL term replacing a deprecated ``term``, if the ontology names one.

        A successor that is deprecated in turn is followed to its own successor; a chain that
        ends in a deprecated term without one (or loops) gives None.
        """
        term = _key(term)
        seen = {term}
        rep = self._term(term).get("replaced_by")
        while isinstance(rep, str) and rep in self.terms and rep not in seen:
            if not self.is_deprecated(rep):
                return rep
            seen.add(rep)
            rep = self.terms[rep].get("replaced_by")
        return None

    def ancestors(self, term: str, include_self: bool = False) -> list[str]:
        """Ancestors of ``term`` (is_a and part_of), nearest first."""
        term = _key(term)
        anc = sorted(self._term(term).get("ancestors", {}).items(), key=lambda kv: (kv[1], kv[0]))
        return ([term] if include_self else []) + [a for a, _ in anc if a in self.terms]

    def descendants(self, term: str, include_self: bool = False) -> list[str]:
        """Descendants of ``term``, sorted by id."""
        term = _key(term)
        self._term(term)
        if self._children is None:
            self._children = {}
            for t, info in self.terms.items():
                for a in info.get("ancestors", {}):
                    self._children.setdefault(a, set()).add(t)
        out = sorted(self._children.get(term, set()))
        return ([term] if include_self else []) + out

    def distance(self, term: str, ancestor: str) -> int | None:
        """Steps from ``term`` up to ``ancestor`` (0 for itself); None if not an ancestor."""
        term, ancestor = _key(term), _key(ancestor)
        self._term(ancestor)  # (either not a term: an error, not "no ancestor" or 0)
        info = self._term(term)
        return 0 if term == ancestor else info.get("ancestors", {}).get(ancestor)

    def _term(self, term: str) -> dict[str, Any]:
        try:
            return self.terms[term]
        except (KeyError, TypeError):
            if not isinstance(term, str):  # (several: a TypeError naming harmonize)
                _one_label(term, "a lookup of a term")
            named = self._resolve(term) if isinstance(term, str) else None
            if named is not None:  # (a name, a synonym or another spelling of an id)
                raise OntologyError(
                    f"{term!r} names {named} ({self.terms[named]['label']!r}), but this takes "
                    f"the id itself, written as 'CL:0000236': pass {named!r} "
                    f"(cl.term({term!r}) gives the current id a label names)."
                ) from None
            raise OntologyError(
                f"{term!r} is not a Cell Ontology term (CL {self.version})."
            ) from None

    # -- label sets -----------------------------------------------------------------------
    def closure(self, labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Boolean matrices over ``labels``: ``ancestor[i, j]`` is True when ``labels[j]`` is a
        strict ancestor of ``labels[i]``; ``descendant`` is its transpose. A label listed
        twice gets the same rows and columns at both places.

        A deprecated term (a model's label, saved under an older release) has no relations
        of its own: it stands for its successor, the type it now names, in both directions
        (and is neither ancestor nor descendant of the successor, nor of another term it
        shares it with: :meth:`related` calls them the same). One without a successor
        relates to nothing (a warning says so).
        """
        return self._closure(self._current_terms(labels, stacklevel=3))

    def _closure(self, current: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`closure` over labels' current terms (:meth:`_current_terms`)."""
        by_term: dict[str, list[int]] = {}
        for i, t in enumerate(current):
            by_term.setdefault(t, []).append(i)
        anc = np.zeros((len(current), len(current)), dtype=bool)
        for t, rows in by_term.items():
            if not self.is_deprecated(t):  # (one without a successor: no ancestors known)
                for a in self._term(t).get("ancestors", {}):
                    if a != t and a in by_term:
                        anc[np.ix_(rows, by_term[a])] = True
        return anc, anc.T.copy()

    def _current_terms(self, labels: Sequence[str], stacklevel: int = 2) -> list[str]:
        """Each label's current term: itself, or a deprecated one's successor (itself where
        it has none, with a warning: ``stacklevel`` as :func:`cellsift._warnings.warn`'s,
        counted from here)."""
        current, orphans = [], []
        for t in labels:
            rep = self.replacement(t) if self.is_deprecated(t) else t
            if rep is None and t not in orphans:
                orphans.append(t)
            current.append(rep if rep is not None else t)
        if orphans:
            from .._warnings import warn

            one = len(orphans) == 1
            more = f" and {len(orphans) - 5} more" if len(orphans) > 5 else ""
            warn(
                f"{', '.join(orphans[:5])}{more} {'is' if one else 'are'} deprecated in CL "
                f"{self.version} without a successor: the ontology relates "
                f"{'it' if one else 'them'} to no other label (triplet mining can then take "
                "a former ancestor as a negative).",
                stacklevel=stacklevel,
            )
        return current

    def related(self, labels: Sequence[str]) -> np.ndarray:
        """``related[i, j]``: ``labels[i]`` and ``labels[j]`` name the same current term (a
        deprecated label its successor's), or one is an ancestor of the other (such pairs
        must not serve as negatives)."""
        return self.relations(labels, stacklevel=3)[1]

    def relations(
        self, labels: Sequence[str], stacklevel: int = 2
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(ancestor, related)``: :meth:`closure`'s first matrix and :meth:`related`, from
        one reading of the labels (one warning, where one is due)."""
        current = self._current_terms(labels, stacklevel=stacklevel + 1)
        anc, desc = self._closure(current)
        same = np.asarray(current, dtype=object)
        return anc, anc | desc | (same[:, None] == same[None, :])

    def harmonize(self, values: Iterable[str], *, replace_deprecated: bool = True) -> list[str]:
        """Map CL ids or names (labels, synonyms; any case, spaces around them ignored and
        runs of them within read as one) onto current CL ids.

        Deprecated ids are replaced by their successor where the ontology names one. Values that
        cannot be mapped raise one error that counts them and lists them (the first 20 of
        each kind).
        """
        if isinstance(values, str):
            raise TypeError(
                f"harmonize maps a list of labels, not the text {values!r} (its letters): pass "
                f"[{values!r}], or term({values!r}) for one label's id."
            )
        values = list(values)
        cache: dict[str, str | None] = {}
        missing = []  # (NaN floats of a column are as many objects as cells: counted once)
        for v in set(values):
            if _missing(v):
                missing.append(v)
            else:
                cache[v] = self._harmonize_one(str(v), replace_deprecated)
        # (key=str: labels with gaps mix NaN floats, None or pandas' NA with text)
        failed = sorted((v for v, t in cache.items() if t is None), key=str)
        failed += missing[:1]  # (None, NaN, NA alike: "a missing value", once)
        if failed:
            # (a dict finds pandas' NA by identity; a list's `in` would compare it)
            # (no label: missing, blank, 'unknown', 'NaN'...: the rule dropna reads)
            absent = dict(zip(failed, no_label(np.array(failed, dtype=object)), strict=True))
            named = {v: not absent[v] and self._resolve(str(v)) is not None for v in failed}
            obsolete = [v for v in failed if named[v]]
            unknown = [v for v in failed if not named[v] and not absent[v]]
            parts = []
            if n_absent := sum(absent.values()):
                kinds = "a value that means" if n_absent == 1 else "values that mean"
                blank = {v for v in failed if absent[v] and not _missing(v)}
                cells = sum(1 for v in values if _missing(v) or v in blank)
                parts.append(
                    f"The labels hold {kinds} no label (missing, blank, 'unknown': "
                    f"{_listing([v for v in failed if absent[v]])}; {cells:,} of "
                    f"{len(values):,}), which name no cell type: "
                    "drop those cells first (CellCollection(dropna=[key]), which drops them all)."
                )
            if unknown:
                parts.append(
                    f"{_count(unknown, 'not a Cell Ontology term', 'not Cell Ontology terms')}"
                    f" (CL {self.version}): "
                    f"{_listing(unknown)}. Use CL ids (CL:0000236) or CL names ('B cell')."
                )
            if obsolete:
                how = "without a current successor" if replace_deprecated else "(deprecated)"
                parts.append(
                    f"{_count(obsolete, 'an obsolete CL term', 'obsolete CL terms')} {how}: "
                    f"{_listing(obsolete)}. Relabel them with current terms."
                )
            raise OntologyError(" ".join(parts))
        return [cache[v] for v in values]  # type: ignore[misc]

    def _resolve(self, value: str) -> str | None:
        """The CL id that ``value`` (an id in any common form, a name or a synonym) names,
        deprecated or not; None if none (a blank value names none)."""
        value = _spaced(value)
        if not value:
            return None
        m = _CL_ID.match(value)  # cl:0000236, CL_0000236, an OBO PURL
        term = f"CL:{m.group(1)}" if m else value
        if term in self.terms:
            return term
        folded = value.casefold()
        return (
            self.id(value)
            or self._by_obsolete.get(folded.removeprefix("obsolete ").strip())
            or self._by_obsolete_synonym.get(folded)
        )

    def resolve(self, value: Any) -> str | None:
        """The CL id that ``value`` (an id in any common form, a name or a synonym) names as
        written: a deprecated term stays itself (:meth:`term` gives what replaces it); None
        where it names none."""
        one = _one_label(value, "resolve()")
        return None if one is None else self._resolve(str(one))

    def term(self, value: Any) -> str | None:
        """The current CL id ``value`` names (as :meth:`harmonize` maps it), or None where it
        names none (not a CL term, missing, obsolete without a successor)."""
        one = _one_label(value, "term()")
        return None if one is None else self._harmonize_one(str(one), True)

    def _harmonize_one(self, value: str, replace_deprecated: bool) -> str | None:
        term = self._resolve(value)
        if term is None:
            return None
        if self.is_deprecated(term):
            return self.replacement(term) if replace_deprecated else None
        return term

    def coarsen_rare(
        self, labels: Sequence[str], studies: Sequence[Any], *, min_studies: int = 2
    ) -> tuple[list[str | None], CoarsenReport]:
        """Move labels seen in fewer than ``min_studies`` studies to their most viable parent.

        The parent is the nearest ancestor, within the label set, that is itself seen in at
        least ``min_studies`` studies; ties go to the one seen in more studies, then to the
        smaller id (deterministic). Labels without such a parent become None (dropped); the
        report says what moved where and what was dropped. Cells without a study (None, NaN,
        or text that spells a missing value: ``unknown``, ``nan``, blank) count toward no
        study; cells without a label (None, NaN, NA, or text that spells a missing value)
        stay None and count toward no label. A study is one value per cell, or a tuple of
        values (donor and batch), each read as a study column's values are.
        """
        labels, studies = list(labels), list(studies)
        if len(labels) != len(studies):
            raise ValueError("labels and studies must be parallel.")
        held_labels = np.empty(len(labels), dtype=object)
        held_labels[:] = labels
        unlabelled = list(no_label(held_labels)) if labels else []
        not_ids = sorted(
            {
                lab
                for lab, none in zip(labels, unlabelled, strict=True)
                if not none and (lab not in self.terms or self.is_deprecated(lab))
            },
            key=str,
        )
        if not_ids:
            raise OntologyError(
                f"coarsen_rare takes current Cell Ontology ids, and {_listing(not_ids)} "
                f"{'is' if len(not_ids) == 1 else 'are'} not (or "
                f"{'is' if len(not_ids) == 1 else 'are'} deprecated): map names and ids to current ids with harmonize() "
                "first."
            )
        seen: dict[str, set[str]] = {}
        cells: dict[str, int] = {}
        # a missing study, or text that spells one ("unknown", "nan"), counts as none
        from ..data.collection import _as_text  # (not at import: data imports this lazily)

        # studies read as a study column is read (1, 1.0 and "1" are one study)
        held = _studies_as_values(studies)
        texts: Any = _as_text(held) if studies else []
        none = no_label(texts) if studies else np.zeros(0, dtype=bool)
        for lab, st, missing, unlabelled_cell in zip(labels, texts, none, unlabelled, strict=True):
            if unlabelled_cell:
                continue
            studies_of = seen.setdefault(lab, set())
            cells[lab] = cells.get(lab, 0) + 1
            if not missing:
                studies_of.add(st)
        n_studies = {lab: len(s) for lab, s in seen.items()}
        viable = {lab for lab, n in n_studies.items() if n >= min_studies}
        report = CoarsenReport(studies=n_studies)
        mapping: dict[str, str | None] = {lab: lab for lab in viable}
        for lab in sorted(set(seen) - viable):
            anc = self._term(lab).get("ancestors", {})
            options = [(d, -n_studies[a], a) for a, d in anc.items() if a in viable]
            mapping[lab] = min(options)[2] if options else None
            if mapping[lab] is None:
                report.dropped[lab] = cells[lab]
            else:
                report.moved[lab] = mapping[lab]  # type: ignore[assignment]
        out = [None if none else mapping[lab] for lab, none in zip(labels, unlabelled, strict=True)]
        return out, report
