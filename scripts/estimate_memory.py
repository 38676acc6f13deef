"""Estimate the peak GPU memory per rank of each full recipe at the paper's global batch.

ESTIMATED, not measured: no GPU was available where this was written. The estimate is

    peak(b) = states + b * activations_per_sample

- ``states``: fp32 weights of every network of the method (online, target/key, heads, queues),
  their gradients, the optimiser's momentum, and DDP's gradient buckets (one more copy of the
  gradients), all counted from the real modules;
- ``activations_per_sample``: the bytes of the tensors autograd keeps for the backward pass
  (``torch.autograd.graph.saved_tensors_hooks``, each storage counted once), measured by a
  forward pass of the real method on this CPU at per-rank batches 2 and 4 (the difference is
  the per-sample cost), in fp32 and under bf16 autocast;
- the input views (fp32) are added per sample.

Not counted: the CUDA context and cuDNN/cuBLAS workspaces (typically 0.5-2 GiB), allocator
fragmentation, and the transient gradient of the largest activation during backward. Read the
numbers as a lower bound to plan against with ~20 % headroom.

    python scripts/estimate_memory.py            # the table of docs/distributed.md
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from medp2x.methods import build_method, recipe_for
from medp2x.networks import build_encoder

METHODS = ("simclr", "swav", "byol", "moco")
GIB = 2**30


def saved_bytes(method: nn.Module, views: list[torch.Tensor], bf16: bool) -> int:
    """Bytes autograd saves for backward in one training forward pass."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            method(views)
    return sum(storages.values())


def views_for(recipe, batch: int) -> list[torch.Tensor]:
    spec = recipe.views
    sizes = [spec.large_size] * spec.n_large + [spec.small_size] * spec.n_small
    return [torch.rand(batch, 3, s, s) for s in sizes]


def state_bytes(method: nn.Module) -> int:
    """Weights, buffers (queues, BN statistics), and for the trained parameters their gradient,
    momentum and DDP bucket, in fp32."""
    weights = sum(p.numel() for p in method.parameters()) * 4
    buffers = sum(b.numel() * b.element_size() for b in method.buffers())
    trained = sum(p.numel() for p in method.parameters() if p.requires_grad) * 4
    return weights + buffers + 3 * trained


def estimate(name: str) -> dict:
    recipe = recipe_for(name, "full")
    torch.manual_seed(0)
    method = build_method(name, build_encoder(recipe.arch), recipe=recipe).train()
    per_sample = {}
    for bf16 in (False, True):
        small, large = (saved_bytes(method, views_for(recipe, b), bf16) for b in (2, 4))
        per_sample[bf16] = (large - small) / 2
    inputs = sum(v[0].numel() * 4 for v in views_for(recipe, 1))
    return {
        "method": name,
        "arch": recipe.arch,
        "global_batch": recipe.batch_size,
        "states": state_bytes(method),
        "fp32": per_sample[False] + inputs,
        "bf16": per_sample[True] + inputs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    header = "| method | global batch | states (GiB) | MiB per sample fp32 / bf16 |"
    header += "".join(f" {n} ranks: per-rank batch, GiB fp32 / bf16 |" for n in args.ranks)
    print(header)
    print("|" + "---|" * (4 + len(args.ranks)))
    for name in METHODS:
        e = estimate(name)
        row = (
            f"| {name} ({e['arch']}) | {e['global_batch']} | {e['states'] / GIB:.2f} | "
            f"{e['fp32'] / 2**20:.0f} / {e['bf16'] / 2**20:.0f} |"
        )
        for n in args.ranks:
            b = e["global_batch"] // n
            fp32, bf16 = ((e["states"] + b * e[k]) / GIB for k in ("fp32", "bf16"))
            row += f" {b}: {fp32:.0f} / {bf16:.0f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
