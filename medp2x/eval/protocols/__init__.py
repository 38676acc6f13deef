"""The downstream protocols, one module each: ``finetune`` (the paper's), ``linear`` (probe on
frozen features) and ``knn``; ``scores`` turns their outputs into metrics."""
