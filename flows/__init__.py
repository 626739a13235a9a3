"""Prefect flows that drive the ``pipeline`` engine: ``kmeans-fit`` and ``kmeans-predict``."""

from .fit import kmeans_fit
from .predict import kmeans_predict

__all__ = ["kmeans_fit", "kmeans_predict"]
