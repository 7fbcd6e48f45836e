"""Losses on the device: ontology-aware triplet mining and loss."""

from .triplet import MiningBuffers, TripletLoss, Triplets, mine_triplets, pairwise_distance

__all__ = ["MiningBuffers", "TripletLoss", "Triplets", "mine_triplets", "pairwise_distance"]
