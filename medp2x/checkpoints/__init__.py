"""Read any supported ResNet checkpoint as a torchvision-layout backbone, safely and audibly.

P2X starts from someone else's ImageNet self-supervised weights. Each publisher uses its own
layout (``docs/checkpoints.md``); this package maps all of them to torchvision key names
without ``fc`` and says exactly what it did in a ``LoadReport``.

Modules, in the order a load runs through them:

- ``load``: the raw object, via ``torch.load(weights_only=True)`` or, for raw pickles (the
  BYOL file), ``unpickler``: the restricted unpickler, the security boundary, kept apart.
- ``formats/``: one module per publisher (torchvision, swav, moco, simclr_tonylins,
  simclr_separius, byol, medp2x), each declaring detect + map + normalisation in one
  ``CheckpointFormat``; ``formats.REGISTRY`` lists them in detection order.
- ``assembly``: shape checks against torchvision, strict or partial; ``infer_arch``.
- ``stems``: RGB -> gray first convolution.
- ``report``: ``LoadReport``; ``encoder_file``: the files medp2x writes (``save_encoder``,
  ``export_state_dict`` and its sidecar); ``normalization``: ImageNet's mean/std and friends.
- ``read``: ``read_checkpoint`` and ``load_encoder``, which tie these together.
"""

from medp2x.checkpoints.assembly import infer_arch
from medp2x.checkpoints.encoder_file import (
    ENCODER_FILE_VERSION,
    export_state_dict,
    save_encoder,
    sidecar_path,
)
from medp2x.checkpoints.formats import FORMATS, REGISTRY, detect_format
from medp2x.checkpoints.formats.swav import SWAV_NORMALIZATION
from medp2x.checkpoints.load import load_file, torch_load_safe
from medp2x.checkpoints.normalization import IMAGENET
from medp2x.checkpoints.read import load_encoder, read_checkpoint
from medp2x.checkpoints.report import LoadReport, describe_normalization, summarize_keys
from medp2x.checkpoints.stems import GRAY_MODES, gray_stem
from medp2x.checkpoints.unpickler import safe_unpickle

__all__ = [
    "ENCODER_FILE_VERSION",
    "FORMATS",
    "GRAY_MODES",
    "IMAGENET",
    "REGISTRY",
    "SWAV_NORMALIZATION",
    "LoadReport",
    "describe_normalization",
    "detect_format",
    "export_state_dict",
    "gray_stem",
    "infer_arch",
    "load_encoder",
    "load_file",
    "read_checkpoint",
    "safe_unpickle",
    "save_encoder",
    "sidecar_path",
    "summarize_keys",
    "torch_load_safe",
]
