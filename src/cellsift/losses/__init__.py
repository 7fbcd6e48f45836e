"""Losses on the device: ontology-aware triplet mining and loss."""

from .triplet import TripletLoss, Triplets, mine_triplets, pairwise_distance

__all__ = ["TripletLoss", "Triplets", "mine_triplets", "pairwise_distance"]
