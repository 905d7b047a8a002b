"""Recommender models: SASRec (the Transformer) and the baselines it must beat."""

from shopml.models.baselines import (
    ImplicitALSRecommender,
    ItemKNNRecommender,
    PopularityRecommender,
)
from shopml.models.sasrec import SASRec, SASRecConfig, left_pad

__all__ = [
    "ImplicitALSRecommender",
    "ItemKNNRecommender",
    "PopularityRecommender",
    "SASRec",
    "SASRecConfig",
    "left_pad",
]
