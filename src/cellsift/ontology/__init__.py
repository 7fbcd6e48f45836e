"""The Cell Ontology, offline: ids and names, ancestors and descendants, label harmonisation."""

from ._cl import CellOntology, CoarsenReport, OntologyError, load_cell_ontology

__all__ = ["CellOntology", "CoarsenReport", "OntologyError", "load_cell_ontology"]
