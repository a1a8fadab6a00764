"""Seeded k-means (k-means++ seeding, Lloyd iterations): codebook initialisation of the VQ
layers and the components of the composition branch."""

from __future__ import annotations

import torch

__all__ = ["kmeans", "sq_distances"]


def sq_distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(N, K) squared L2 distances between (N, p) rows and (K, p) centroids."""
    return (
        (x * x).sum(1, keepdim=True) - 2.0 * x @ centroids.t() + (centroids * centroids).sum(1)
    ).clamp_min_(0.0)


def _kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centroid drawn with probability ∝ squared distance."""
    first = int(torch.randint(x.shape[0], (1,), generator=generator))
    centroids = x[first : first + 1]
    nearest = sq_distances(x, centroids)[:, 0]
    for _ in range(1, k):
        weights = nearest if float(nearest.sum()) > 0 else torch.ones_like(nearest)
        pick = int(torch.multinomial(weights, 1, generator=generator))
        centroids = torch.cat([centroids, x[pick : pick + 1]])
        nearest = torch.minimum(nearest, sq_distances(x, x[pick : pick + 1])[:, 0])
    return centroids


def kmeans(
    x: torch.Tensor, k: int, iterations: int = 50, restarts: int = 3, seed: int = 0
) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding; the best of ``restarts`` runs by inertia.

    Deterministic for a given ``seed`` (CPU generator, float64 arithmetic). An emptied cluster is
    re-seeded at the point farthest from its centroid, so all ``k`` centroids stay in use.

    Args:
        x: (N, p) points, N >= k.
        k: number of clusters.

    Returns:
        (k, p) float32 centroids on ``x``'s device.
    """
    if x.dim() != 2 or x.shape[0] < k:
        raise ValueError(f"kmeans needs (N, p) points with N >= k={k}, got {tuple(x.shape)}")
    points = x.detach().to("cpu", torch.float64)
    generator = torch.Generator().manual_seed(seed)
    best, best_inertia = None, float("inf")
    for _ in range(restarts):
        centroids = _kmeans_pp(points, k, generator)
        for _ in range(iterations):
            dist = sq_distances(points, centroids)
            assign = dist.argmin(1)
            counts = torch.bincount(assign, minlength=k)
            sums = torch.zeros_like(centroids).index_add_(0, assign, points)
            updated = sums / counts.clamp_min(1)[:, None].to(sums.dtype)
            mindist = dist.gather(1, assign[:, None])[:, 0]
            for empty in torch.nonzero(counts == 0)[:, 0].tolist():
                far = int(mindist.argmax())
                updated[empty] = points[far]
                mindist[far] = 0.0
            if torch.equal(updated, centroids):
                break
            centroids = updated
        inertia = float(sq_distances(points, centroids).min(1).values.sum())
        if inertia < best_inertia:
            best, best_inertia = centroids, inertia
    assert best is not None
    return best.float().to(x.device)
