"""The SSL losses as pure functions of embeddings, usable without the method modules.

Each takes the tensors a method's heads produce and returns the loss (and, for the contrastive
ones, its top-1 accuracy); none holds state. Cross-rank terms (SimCLR's global negatives,
Sinkhorn's marginals, DINO's centre) go through ``medp2x.distributed``, which is the identity in
one process. Inputs are promoted to float32 at least, so the losses keep full precision under
bf16 autocast (float64 stays float64, for exact tests).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medp2x.distributed import all_reduce_max, all_reduce_sum, gather_with_grad, rank, world_size

# The TF SimCLR code masks self-similarities with a large finite number rather than -inf.
_LARGE = 1e9


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Losses run in float32 under bf16 autocast (float64 stays float64, for exact tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# --- SimCLR -------------------------------------------------------------------------------------


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> dict[str, torch.Tensor]:
    """SimCLR's NT-Xent of this rank's pairs against the global batch.

    Each rank averages over its own 2n anchors; DDP's gradient averaging over W ranks then
    yields the gradient of the mean over all 2nW anchors, i.e. the single-process loss.
    Ranks must hold equal batch sizes (labels are offset by ``rank * n``).
    """
    z1 = F.normalize(at_least_float32(z1), dim=1)
    z2 = F.normalize(at_least_float32(z2), dim=1)
    z1_all, z2_all = gather_with_grad(z1), gather_with_grad(z2)
    n = z1.shape[0]
    labels = torch.arange(n, device=z1.device) + rank() * n
    self_mask = F.one_hot(labels, z1_all.shape[0]).bool()
    logits_aa = (z1 @ z1_all.T / temperature).masked_fill(self_mask, -_LARGE)
    logits_bb = (z2 @ z2_all.T / temperature).masked_fill(self_mask, -_LARGE)
    logits_ab = z1 @ z2_all.T / temperature
    logits_ba = z2 @ z1_all.T / temperature
    logits_a = torch.cat([logits_ab, logits_aa], dim=1)
    logits_b = torch.cat([logits_ba, logits_bb], dim=1)
    loss = (F.cross_entropy(logits_a, labels) + F.cross_entropy(logits_b, labels)) / 2
    with torch.no_grad():
        top1 = (
            (logits_a.argmax(1) == labels).float().mean()
            + (logits_b.argmax(1) == labels).float().mean()
        ) / 2
    return {"loss": loss, "top1": top1}


# --- BYOL ---------------------------------------------------------------------------------------


def regression_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BYOL's normalised MSE, per sample: ``||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z)``."""
    p = F.normalize(at_least_float32(prediction), dim=1)
    z = F.normalize(at_least_float32(target), dim=1)
    return 2.0 - 2.0 * (p * z).sum(dim=1)


# --- MoCo ---------------------------------------------------------------------------------------


def info_nce(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float
) -> dict[str, torch.Tensor]:
    """MoCo's InfoNCE: cross-entropy of each query picking its key (index 0) among itself and
    the queue of past keys (rows)."""
    q = F.normalize(at_least_float32(q), dim=1)
    k = F.normalize(at_least_float32(k), dim=1).detach()
    l_pos = (q * k).sum(dim=1, keepdim=True)
    l_neg = q @ queue.detach().clone().to(q).T  # a copy: the queue changes before backward
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    loss = F.cross_entropy(logits, labels)
    top1 = (logits.detach().argmax(dim=1) == 0).float().mean()
    return {"loss": loss, "top1": top1}


# --- SwAV and DINO: predicting another crop's distribution over K prototypes --------------------


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """SwAV's soft assignments (rows sum to 1) of B samples to K prototypes with equal mass.

    ``scores`` is this rank's B x K block; the K prototype marginals are summed over all ranks,
    so the equipartition holds over the global batch, as in ``distributed_sinkhorn``. The
    iterations are the original's, carried out on ``log Q``: ``exp(scores / eps)`` overflows
    float32 for eps < 0.01 and whole rows underflow to 0 (then NaN) once shifted.
    """
    log_q = at_least_float32(scores).T / epsilon  # K x B
    n_prototypes = log_q.shape[0]
    n_samples = log_q.shape[1] * world_size()
    log_q = log_q - _global_logsumexp(log_q.reshape(1, -1))  # Q /= sum(Q)
    for _ in range(iterations):
        log_q = log_q - _global_logsumexp(log_q) - math.log(n_prototypes)  # prototype mass 1/K
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(n_samples)
    return torch.exp(log_q + math.log(n_samples)).T  # sample mass 1


def _global_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """Row-wise ``log sum exp`` over the columns of ``x`` on every rank (shape R x 1)."""
    peak = all_reduce_max(x.max(dim=1, keepdim=True).values.clone())
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = all_reduce_sum(torch.exp(x - peak).sum(dim=1, keepdim=True))
    return torch.log(total) + peak


def swapped_prediction_loss(
    scores: torch.Tensor,
    assignments: list[torch.Tensor],
    n_views: int,
    temperature: float,
) -> torch.Tensor:
    """Mean over target crops ``c`` and other crops ``v`` of ``-sum_k q_c log softmax(s_v / T)``.

    ``scores`` holds ``n_views`` blocks of B rows in view order; ``assignments[c]`` is the B x K
    target distribution of crop ``c``: SwAV's Sinkhorn codes, or DINO's sharpened teacher
    output (``teacher_distribution``; DINO's mean over all (teacher, student) pairs is this
    mean of means, every teacher crop having ``n_views - 1`` partners).
    """
    blocks = at_least_float32(scores).chunk(n_views, dim=0)
    log_probs = [F.log_softmax(block / temperature, dim=1) for block in blocks]
    loss = scores.new_zeros((), dtype=log_probs[0].dtype)
    for crop, q in enumerate(assignments):
        others = [v for v in range(n_views) if v != crop]
        subloss = sum(-(q * log_probs[v]).sum(dim=1).mean() for v in others)
        loss = loss + subloss / len(others)
    return loss / len(assignments)


@torch.no_grad()
def teacher_distribution(
    teacher: torch.Tensor, center: torch.Tensor, temperature: float | torch.Tensor
) -> torch.Tensor:
    """DINO's targets: ``softmax((t - C) / T)`` — centring keeps one dimension from dominating,
    the low temperature sharpens against the uniform collapse that centring alone invites."""
    return F.softmax((at_least_float32(teacher) - center) / temperature, dim=1)


@torch.no_grad()
def updated_center(center: torch.Tensor, teacher: torch.Tensor, momentum: float) -> torch.Tensor:
    """DINO's centre after a batch: ``m C + (1 - m) mean_rows(t)``, the mean over the global
    batch (all ranks), as ``DINOLoss.update_center``."""
    teacher = at_least_float32(teacher)
    batch_sum = all_reduce_sum(teacher.sum(dim=0, keepdim=True))
    batch_center = batch_sum / (teacher.shape[0] * world_size())
    return center * momentum + batch_center.to(center) * (1.0 - momentum)
