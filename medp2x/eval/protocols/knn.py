"""kNN protocol: cosine similarity, k nearest training features vote with weight exp(sim / T)
(Wu et al. 2018; DINO's k = 20, T = 0.07).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def knn_scores(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    query_x: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores (rows sum to 1) from the k most cosine-similar training features, each
    voting with weight exp(similarity / T) (Wu et al. 2018, DINO)."""
    k = min(k, len(train_x))
    train_n = F.normalize(train_x, dim=1)
    out = []
    for start in range(0, len(query_x), chunk):
        sims = F.normalize(query_x[start : start + chunk], dim=1) @ train_n.T
        top_sims, top_idx = sims.topk(k, dim=1)
        weights = (top_sims / temperature).exp()
        votes = torch.zeros(len(sims), num_classes, device=sims.device, dtype=sims.dtype)
        votes.scatter_add_(1, train_y[top_idx], weights)
        out.append(votes / votes.sum(1, keepdim=True))
    return torch.cat(out)
