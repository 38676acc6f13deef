"""The registry of the paper's ten datasets: for each, the pretraining data, the downstream data
and classes, the modality, where the data come from, and the setting that points at them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from torch.utils.data import Dataset

from medp2x.data.paper.common import HELD_OUT, SPLIT_SEED, Splits, read_medical_images
from medp2x.data.paper.folders import (
    BUSI_CLASSES,
    COVID_CLASSES,
    EUROSAT_CLASSES,
    MRI_CLASSES,
    read_busi_downstream,
    read_busi_pretraining,
    read_covid_radiography,
    read_eurosat_downstream,
    read_eurosat_pretraining,
    read_mri_downstream,
    read_mri_pretraining,
)
from medp2x.data.paper.histo import read_pcam, read_slides
from medp2x.data.paper.natural import (
    read_aircraft_downstream,
    read_aircraft_pretraining,
    read_tfds_downstream,
    read_tfds_pretraining,
    read_utkface,
)


@dataclass(frozen=True)
class DataSpec:
    """One dataset a benchmark reads, as a user has to find and lay it out."""

    what: str  # published name
    reader: str  # how it is read
    layout: str  # what the folder holds
    obtain: str  # where to get it
    override: str  # the bundle setting that points at the folder


@dataclass(frozen=True)
class PaperDataset:
    name: str
    title: str  # column name in the paper's tables
    modality: str  # "rgb" | "gray": channels of the encoder and the augmentation recipe
    pretraining: DataSpec
    downstream: DataSpec
    num_classes: int
    classes: str  # what the downstream label is
    test_split: str  # how the downstream test split is made
    read_pretraining: Callable[..., Dataset]  # (root, image_size, *, on_error, **options)
    read_downstream: Callable[..., Splits]  # (root, image_size, *, on_error, **options)
    options: Mapping[str, object] = field(default_factory=dict)  # benchmark-specific settings

    @property
    def same_set(self) -> bool:
        """Downstream data come from the pretraining folder (the default for ``downstream_dir``)."""
        return self.downstream.override == "data_dir"

    @property
    def gray(self) -> bool:
        return self.modality == "gray"

    @property
    def downstream_data(self) -> DataSpec:
        """The downstream dataset, spelled out also for same-set benchmarks."""
        return self.pretraining if self.downstream is SAME_SET else self.downstream

    @property
    def default_data_dir(self) -> str:
        """Where the bundles look without --data_dir (Histo's bundles: none, the demo slide)."""
        return "~/tensorflow_datasets" if self.pretraining.reader == "tfds" else f"data/{self.name}"

    def missing(self, spec: DataSpec, root: str | Path | None) -> str:
        """The one-line answer to "where is my data": what, layout, source, setting."""
        if spec is SAME_SET:
            spec = self.downstream_data
        where = f" in {root}" if root is not None else ""
        return (
            f"{self.name}: {spec.what} not found{where} (expected {spec.layout}). "
            f"Get it from {spec.obtain}; then set --{spec.override}"
        )


OFFICIAL = "the dataset's official train / test split"


HELD = f"{HELD_OUT:.0%} of each class held out (seed {SPLIT_SEED}); pretraining uses the rest"


TFDS_LAYOUT = "a TFDS data dir holding {} prepared as ArrayRecord"


TFDS_HOWTO = (
    "TensorFlow Datasets ({}): prepare it on a machine with internet with "
    "tfds.builder('{}', data_dir=DIR, file_format='array_record').download_and_prepare()"
)


def _tfds_spec(name: str, what: str, extra: str = "") -> DataSpec:
    return DataSpec(
        what, "tfds", TFDS_LAYOUT.format(name), TFDS_HOWTO.format(name, name) + extra, "data_dir"
    )


SAME_SET = DataSpec("the same set", "as for pretraining", "as above", "as above", "data_dir")


DATASETS: dict[str, PaperDataset] = {
    b.name: b
    for b in [
        PaperDataset(
            name="histo", title="Histo", modality="rgb",
            pretraining=DataSpec(
                what="H&E whole-slide images", reader="slides (WSITileDataset)",
                layout="slides in any OpenSlide format (.svs, .ndpi, .mrxs, .tiff, ...), searched recursively",
                obtain="public H&E slides, e.g. TCGA (https://portal.gdc.cancer.gov) or CAMELYON16/17 "
                "(https://camelyon17.grand-challenge.org) without CAMELYON16's testing/ slides, the source of "
                "PCam's test set; the paper used 40k tiles of 60 public sets (Ciga et al. 2020)",
                override="data_dir",
            ),
            downstream=DataSpec(
                what="PatchCamelyon (PCam)", reader="h5 files or TFDS patch_camelyon",
                layout="camelyonpatch_level_2_split_{train,test}_{x,y}.h5 (gunzipped), or a TFDS data dir with patch_camelyon",
                obtain="https://github.com/basveeling/pcam (Zenodo 2546921) or TFDS patch_camelyon",
                override="downstream_dir",
            ),
            num_classes=2, classes="tumour tissue in the central 32 x 32 px (binary)", test_split=OFFICIAL,
            read_pretraining=read_slides, read_downstream=read_pcam,
            options={"tile_size": None, "mpp": None, "min_tissue": 0.5, "cache_dir": None},
        ),
        PaperDataset(
            name="xray", title="Xray", modality="gray",
            pretraining=DataSpec(
                what="ChestX-ray8 (NIH ChestX-ray14 images)", reader="images (DICOM or NIfTI folders too)",
                layout="images/*.png of images_001..012.tar.gz (any folder of PNG/JPEG, DICOM or NIfTI files)",
                obtain="https://nihcc.app.box.com/v/ChestXray-NIHCC",
                override="data_dir",
            ),
            downstream=DataSpec(
                what="COVID-19 Radiography Database", reader="class folders",
                layout="COVID/, Lung_Opacity/, Normal/, Viral Pneumonia/ holding images/*.png (masks/ ignored)",
                obtain="https://www.kaggle.com/datasets/tawsifurrahman/covid19-radiography-database",
                override="downstream_dir",
            ),
            num_classes=4, classes=", ".join(COVID_CLASSES), test_split=HELD,
            read_pretraining=partial(read_medical_images, gray=True), read_downstream=read_covid_radiography,
        ),
        PaperDataset(
            name="mri", title="MRI", modality="gray",
            pretraining=DataSpec(
                what="Brain Tumor Classification (MRI), Bhuvaji et al.", reader="class folders (NIfTI or DICOM folders too)",
                layout="Training/<class>/*.jpg and Testing/<class>/*.jpg, classes " + ", ".join(MRI_CLASSES),
                obtain="https://www.kaggle.com/datasets/sartajbhuvaji/brain-tumor-classification-mri",
                override="data_dir",
            ),
            downstream=SAME_SET,
            num_classes=4, classes=", ".join(MRI_CLASSES), test_split="the set's Training / Testing folders",
            read_pretraining=read_mri_pretraining, read_downstream=read_mri_downstream,
        ),
        PaperDataset(
            name="us", title="US", modality="gray",
            pretraining=DataSpec(
                what="Breast Ultrasound Images (BUSI), Al-Dhabyani et al.", reader="class folders",
                layout="benign/, malignant/, normal/ with '<class> (n).png' (the '_mask' files are ignored)",
                obtain="https://scholar.cu.edu.eg/?q=afahmy/pages/dataset (Dataset_BUSI_with_GT.zip)",
                override="data_dir",
            ),
            downstream=SAME_SET,
            num_classes=3, classes=", ".join(BUSI_CLASSES), test_split=HELD,
            read_pretraining=read_busi_pretraining, read_downstream=read_busi_downstream,
        ),
        PaperDataset(
            name="satellite", title="Satellite", modality="rgb",
            pretraining=DataSpec(
                what="EuroSAT (RGB)", reader="class folders",
                layout="<class>/*.jpg for the 10 classes (the 2750/ folder of EuroSAT.zip)",
                obtain="https://github.com/phelber/EuroSAT (EuroSAT.zip, RGB)",
                override="data_dir",
            ),
            downstream=SAME_SET,
            num_classes=10, classes=", ".join(EUROSAT_CLASSES), test_split=HELD,
            read_pretraining=read_eurosat_pretraining, read_downstream=read_eurosat_downstream,
        ),
        PaperDataset(
            name="sop", title="SOP", modality="rgb",
            pretraining=_tfds_spec("stanford_online_products", "Stanford Online Products"),
            downstream=SAME_SET,
            num_classes=12, test_split=OFFICIAL,
            classes="super_class_id: 12 product categories (the 22,634 class_id products differ between train and test)",
            read_pretraining=partial(read_tfds_pretraining, name="stanford_online_products"),
            read_downstream=partial(read_tfds_downstream, name="stanford_online_products", label_key="super_class_id"),
        ),
        PaperDataset(
            name="food", title="Food", modality="rgb",
            pretraining=_tfds_spec("food101", "Food-101"),
            downstream=SAME_SET,
            num_classes=101, classes="label: 101 dishes", test_split="the official train / validation split",
            read_pretraining=partial(read_tfds_pretraining, name="food101"),
            read_downstream=partial(read_tfds_downstream, name="food101", label_key="label", splits=("train", "validation")),
        ),
        PaperDataset(
            name="celeba", title="CelebA", modality="rgb",
            pretraining=_tfds_spec(
                "celeb_a_hq/256", "CelebA-HQ",
                "; it needs a manual download first: put the data<N>x<N>.tar files made as in "
                "https://github.com/tkarras/progressive_growing_of_gans#preparing-datasets-for-training "
                "into DIR/downloads/manual",
            ),
            downstream=DataSpec(
                what="UTKFace (aligned & cropped faces)", reader="image folder, labels from file names",
                layout="<age>_<gender>_<race>_<date>.jpg.chip.jpg files",
                obtain="https://susanqq.github.io/UTKFace/ (UTKFace.tar.gz)",
                override="downstream_dir",
            ),
            num_classes=5, test_split=HELD,
            classes="UTKFace option 'target': ethnicity (5 classes, default), gender (2) or age (7 decade bins)",
            read_pretraining=read_tfds_pretraining, read_downstream=read_utkface,
            options={"name": "celeb_a_hq/256", "target": "ethnicity"},
        ),
        PaperDataset(
            name="cars", title="Cars", modality="rgb",
            pretraining=_tfds_spec("cars196", "Stanford Cars"),
            downstream=SAME_SET,
            num_classes=196, classes="label: 196 car models", test_split=OFFICIAL,
            read_pretraining=partial(read_tfds_pretraining, name="cars196"),
            read_downstream=partial(read_tfds_downstream, name="cars196", label_key="label"),
        ),
        PaperDataset(
            name="aircraft", title="Aircraft", modality="rgb",
            pretraining=DataSpec(
                what="FGVC-Aircraft 2013b", reader="official archive (not in the TFDS catalogue)",
                layout="fgvc-aircraft-2013b/data/images/*.jpg with images_variant_{trainval,test}.txt and variants.txt",
                obtain="https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/ (fgvc-aircraft-2013b.tar.gz)",
                override="data_dir",
            ),
            downstream=SAME_SET,
            num_classes=100, classes="variant: 100 aircraft models", test_split="the official trainval / test split",
            read_pretraining=read_aircraft_pretraining, read_downstream=read_aircraft_downstream,
        ),
    ]
}  # fmt: skip


def get(name: str) -> PaperDataset:
    """The registry entry of ``name`` (``histo``, ``xray``, ...), or a clear error."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(DATASETS)}") from None
