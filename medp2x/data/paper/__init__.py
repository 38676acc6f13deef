"""The paper's ten datasets (Ciga et al., Tables 2-5, Figs. 2-3): histo, xray, mri, us,
satellite, sop, food, celeba, cars, aircraft.

Named ``paper`` rather than "benchmarks": in this project a benchmark is a speed or parity
script in ``benchmarks/``; these are the datasets the paper pretrains and evaluates on, each
with its pretraining data, downstream task and fixed test split. The bundles
(``bundles/p1x_<name>.json``, ``p2x_<name>.json``, ``evaluate.json``) keep their names and
their ``benchmark`` argument.

- ``registry``: one ``PaperDataset`` per name (``DATASETS``, ``get``): data, classes, sources.
- ``common``: the fixed held-out split (``HELD_OUT``, ``SPLIT_SEED``) and shared listings.
- ``histo``, ``folders``, ``natural``: the readers of each published layout.
- ``factories``: what bundles call (``dataset_factory``, ``eval_data_factory``).
Evaluation on them lives in ``medp2x.eval.paper``, so the data do not depend on evaluation.
"""

from medp2x.data.paper.common import HELD_OUT, SPLIT_SEED, limit, read_medical_images
from medp2x.data.paper.factories import dataset_factory, eval_data_factory
from medp2x.data.paper.folders import BUSI_CLASSES, COVID_CLASSES, EUROSAT_CLASSES, MRI_CLASSES
from medp2x.data.paper.registry import DATASETS, DataSpec, PaperDataset, get

__all__ = [
    "BUSI_CLASSES",
    "COVID_CLASSES",
    "DATASETS",
    "EUROSAT_CLASSES",
    "HELD_OUT",
    "MRI_CLASSES",
    "SPLIT_SEED",
    "DataSpec",
    "PaperDataset",
    "dataset_factory",
    "eval_data_factory",
    "get",
    "limit",
    "read_medical_images",
]
