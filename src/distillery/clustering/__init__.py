"""Clustering between pipeline stages.

- :mod:`~distillery.clustering.kmeans`: k-means (k-means++ seeded FAISS), assignment,
  cluster statistics;
- :mod:`~distillery.clustering.whitening`: PCA(-whitening) and L2 normalisation;
- :mod:`~distillery.clustering.distributed`: embeddings sharded over ranks, gathered and
  assigned by dataset index, fitted on a bounded sample.
"""

from distillery.clustering.kmeans import KMeansResult, assign, cluster_stats, kmeans
from distillery.clustering.whitening import PCAWhitening, l2_normalize, pca_whiten

__all__ = [
    "KMeansResult",
    "PCAWhitening",
    "assign",
    "cluster_stats",
    "kmeans",
    "l2_normalize",
    "pca_whiten",
]
