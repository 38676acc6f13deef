"""The paper's ten benchmarks (DESIGN.md §3.3): for each, the pretraining data, the downstream
data and classes, the modality, where the data come from, and the setting that points at them.

Bundles use three entry points: ``dataset_factory`` (a P2XJob's ``make_dataset``),
``eval_data_factory`` (its ``make_eval_data``) and ``evaluate_benchmark`` (bundles/evaluate.json).
The natural-scene sets are read from prepared TensorFlow Datasets (``medp2x.data.tfds``); the
medical sets from files in their published layouts through the project's readers.

Test splits follow the paper: "only the training split was used for pretraining". Where a
dataset has no official split (BUSI, EuroSAT, COVID-19 radiography, UTKFace) a stratified
``HELD_OUT`` fraction per class is held out with ``SPLIT_SEED``; pretraining never sees it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset, Subset

from medp2x.data.base import UnreadableFileError, check_on_error, drop_unreadable
from medp2x.data.folder import IMAGE_EXTENSIONS, ImageFileDataset, ImageFolderDataset, to_tensor

logger = logging.getLogger("medp2x.data")

HELD_OUT = 0.2  # test fraction per class where a dataset has no official split
SPLIT_SEED = 0  # fixed, so pretraining and every evaluation agree on the held-out images
Splits = tuple[Dataset, Dataset]


@dataclass(frozen=True)
class DataSpec:
    """One dataset a benchmark reads, as a user has to find and lay it out."""

    what: str  # published name
    reader: str  # how it is read
    layout: str  # what the folder holds
    obtain: str  # where to get it
    override: str  # the bundle setting that points at the folder


@dataclass(frozen=True)
class Benchmark:
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


# ----------------------------------------------------------------------------- file listings


def _image_files(root: Path, exclude: Callable[[Path], bool] | None = None) -> list[Path]:
    """Images under ``root`` (recursive, sorted, hidden entries skipped) minus ``exclude``."""
    files = (
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.name.lower().endswith(IMAGE_EXTENSIONS)
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    return sorted(p for p in files if exclude is None or not exclude(p))


def _class_items(
    root: Path, exclude: Callable[[Path], bool] | None = None, classes: Sequence[str] | None = None
) -> tuple[list[tuple[Path, int]], list[str]]:
    """``root/<class>/**/image`` as (path, label), labels indexing ``classes`` (default: the
    sorted names of the class folders holding images), so two splits share one mapping."""
    per_class = {
        d.name: _image_files(d, exclude)
        for d in sorted(root.iterdir())
        if d.is_dir() and not d.name.startswith(".")
    }
    per_class = {name: files for name, files in per_class.items() if files}
    classes = list(classes) if classes is not None else sorted(per_class)
    unknown = sorted(set(per_class) - set(classes))
    if unknown:
        raise ValueError(
            f"{root}: class folder(s) {', '.join(unknown)} not among {', '.join(classes)}"
        )
    if not per_class:
        raise FileNotFoundError(f"no images in class folders under {root}")
    lookup = {name: i for i, name in enumerate(classes)}
    items = [(f, lookup[name]) for name in sorted(per_class) for f in per_class[name]]
    return items, classes


def _first_existing(
    root: Path, candidates: Sequence[str], wanted: Callable[[Path], bool]
) -> Path | None:
    """The first of ``root/candidate`` that looks like the dataset (archives nest differently)."""
    for rel in candidates:
        path = root / rel
        if path.is_dir() and wanted(path):
            return path
    return None


def _has_class_folders(names: Sequence[str]) -> Callable[[Path], bool]:
    lowered = {n.lower() for n in names}
    return lambda path: lowered <= {d.name.lower() for d in path.iterdir() if d.is_dir()}


def _is_mask(path: Path) -> bool:
    """BUSI's ``benign (1)_mask.png`` / ``_mask_1.png`` and COVID-19 radiography's ``masks/``."""
    return "_mask" in path.stem.lower() or any(p.lower() == "masks" for p in path.parent.parts)


def limit(dataset: Dataset, max_samples: int | None) -> Dataset:
    """At most ``max_samples`` samples, evenly spaced so sorted class folders all stay in."""
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, not {max_samples}")
    keep = np.unique(np.linspace(0, len(dataset) - 1, int(max_samples)).round().astype(int))
    return Subset(dataset, keep.tolist())


def held_out_split(dataset: ImageFileDataset) -> Splits:
    """(train, test) with a stratified ``HELD_OUT`` of each class held out (``SPLIT_SEED``)."""
    from medp2x.data.split import stratified_split

    labels = np.asarray([label for _, label in dataset.items])
    kept, held = stratified_split(labels, HELD_OUT, SPLIT_SEED)
    return Subset(dataset, kept.tolist()), Subset(dataset, held.tolist())


# Readers here never squash: pretraining crops from each image at its own resolution (its
# shorter side capped at image_size = the run's source_size) and evaluation resizes the shorter
# side and centre-crops in its own view (medp2x.eval.images).
KEEP_SHAPE = "cap"


def _labelled(items, classes, gray, image_size, on_error) -> ImageFileDataset:
    return ImageFileDataset(
        items,
        gray=gray,
        image_size=image_size,
        resize=KEEP_SHAPE,
        on_error=on_error,
        classes=classes,
    )


# ----------------------------------------------------------------------------- Histo


def read_slides(
    root: Path,
    image_size: int | None,
    *,
    on_error: str = "skip",
    tile_size: int | None = None,
    mpp: float | None = None,
    min_tissue: float = 0.5,
    cache_dir: str | Path | None = None,
    **_,
) -> Dataset:
    """Tissue tiles of the whole-slide images under ``root`` (any OpenSlide format)."""
    from medp2x.data.wsi import WSITileDataset

    return WSITileDataset(
        root,
        tile_size=tile_size or image_size or 256,
        mpp=mpp,
        min_tissue=min_tissue,
        cache_dir=cache_dir,
        on_error=on_error,
    )


PCAM_FILE = "camelyonpatch_level_2_split_{split}_{xy}.h5"


class PCamH5Dataset(Dataset):
    """One PatchCamelyon split from its official HDF5 files (96 x 96 RGB, label 1 = tumour
    in the central 32 x 32 px). Labels are read at once (N bytes); images lazily, with the
    file opened in each DataLoader worker since h5py handles must not cross a fork."""

    def __init__(self, root: Path, split: str, image_size: int | None = None):
        try:
            import h5py
        except ImportError as err:
            raise ImportError("reading PCam's .h5 files needs h5py: pip install h5py") from err
        self.x_path = root / PCAM_FILE.format(split=split, xy="x")
        y_path = root / PCAM_FILE.format(split=split, xy="y")
        for path in (self.x_path, y_path):
            if not path.is_file():
                gz = path.with_name(path.name + ".gz")
                hint = f" (found {gz.name}: gunzip it first)" if gz.is_file() else ""
                raise FileNotFoundError(f"PCam file {path} is missing{hint}")
        self.labels = _read_h5(h5py, y_path, "y").reshape(-1).astype(np.int64)
        with h5py.File(self.x_path, "r") as handle:
            if "x" not in handle or len(handle["x"]) != len(self.labels):
                raise UnreadableFileError(
                    self.x_path, f"expected dataset 'x' with {len(self.labels)} images"
                )
        self.image_size = image_size
        self._file = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        if self._file is None:
            import h5py

            self._file = h5py.File(self.x_path, "r")
        image = to_tensor(np.asarray(self._file["x"][index]), gray=False)
        if self.image_size is not None and tuple(image.shape[-2:]) != (self.image_size,) * 2:
            from medp2x.data.npz import resize_image

            image = resize_image(image, self.image_size)
        meta = {"path": str(self.x_path), "index": int(index)}
        return {"image": image, "label": int(self.labels[index]), "meta": meta}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None}


def _read_h5(h5py, path: Path, key: str) -> np.ndarray:
    try:
        with h5py.File(path, "r") as handle:
            return np.asarray(handle[key])
    except (OSError, KeyError) as err:
        raise UnreadableFileError(
            path, f"not a PCam HDF5 file with dataset {key!r} ({err})"
        ) from err


def read_pcam(
    root: Path, image_size: int | None, *, on_error: str = "skip", max_samples=None, **_
) -> Splits:
    """PCam train/test from the .h5 files in ``root``, else from TFDS ``patch_camelyon`` there."""
    if (root / PCAM_FILE.format(split="train", xy="x")).is_file():
        return PCamH5Dataset(root, "train", image_size), PCamH5Dataset(root, "test", image_size)
    return _tfds_pair(
        "patch_camelyon",
        "label",
        ("train", "test"),
        root,
        image_size,
        False,
        max_samples,
        "downstream_dir",
    )


# ----------------------------------------------------------------------------- medical folders


def read_medical_images(
    root: Path,
    image_size: int | None,
    *,
    gray: bool,
    on_error: str = "skip",
    exclude: Callable[[Path], bool] | None = None,
    **_,
) -> Dataset:
    """Unlabelled scans under ``root``: DICOM files when there are any, else NIfTI volumes
    (2-D slices), else PNG/JPEG/TIFF images. Users bring their own hospital data this way."""
    from medp2x.data.dicom import DICOM_SUFFIXES
    from medp2x.data.nifti import NIFTI_SUFFIXES

    names = [p.name.lower() for p in root.rglob("*") if p.is_file()]
    if any(n.endswith(DICOM_SUFFIXES) for n in names):
        from medp2x.data.dicom import DicomDataset

        return DicomDataset(
            root,
            image_size=image_size,
            resize=KEEP_SHAPE,
            channels=1 if gray else 3,
            on_error=on_error,
        )
    if any(n.endswith(NIFTI_SUFFIXES) for n in names):
        from medp2x.data.nifti import NiftiSliceDataset

        return NiftiSliceDataset(
            root,
            image_size=image_size,
            resize=KEEP_SHAPE,
            channels=1 if gray else 3,
            on_error=on_error,
        )
    files = _image_files(root, exclude)
    if not files:
        raise FileNotFoundError(f"no DICOM, NIfTI or image files under {root}")
    return ImageFileDataset(
        [(f, -1) for f in files],
        gray=gray,
        image_size=image_size,
        resize=KEEP_SHAPE,
        on_error=on_error,
    )


def _require(root: Path, found: Path | None, bench: str, spec: str) -> Path:
    if found is None:
        b = BENCHMARKS[bench]
        raise FileNotFoundError(b.missing(getattr(b, spec), root))
    return found


COVID_CLASSES = ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia")


def read_covid_radiography(
    root: Path, image_size: int | None, *, on_error: str = "skip", **_
) -> Splits:
    """COVID-19 Radiography Database: ``<class>/images/*.png`` (``masks/`` ignored)."""
    wanted = _has_class_folders(("COVID", "Normal", "Viral Pneumonia"))
    found = _require(
        root,
        _first_existing(root, (".", "COVID-19_Radiography_Dataset"), wanted),
        "xray",
        "downstream",
    )
    items, classes = _class_items(found, exclude=_is_mask)
    return held_out_split(_labelled(items, classes, True, image_size, on_error))


MRI_CLASSES = ("glioma_tumor", "meningioma_tumor", "no_tumor", "pituitary_tumor")


def _bhuvaji(root: Path) -> Path | None:
    wanted = lambda p: (p / "Training").is_dir() and (p / "Testing").is_dir()  # noqa: E731
    return _first_existing(root, (".", "brain-tumor-classification-mri", "archive"), wanted)


def read_mri_pretraining(
    root: Path, image_size: int | None, *, on_error: str = "skip", **_
) -> Dataset:
    """Bhuvaji ``Training/`` images; a folder of NIfTI or DICOM brain scans also works."""
    found = _bhuvaji(root)
    if found is None and _has_volumes(root):
        return read_medical_images(root, image_size, gray=True, on_error=on_error)
    found = _require(root, found, "mri", "pretraining")
    return ImageFolderDataset(
        found / "Training", gray=True, image_size=image_size, resize=KEEP_SHAPE, on_error=on_error
    )


def _has_volumes(root: Path) -> bool:
    from medp2x.data.dicom import DICOM_SUFFIXES
    from medp2x.data.nifti import NIFTI_SUFFIXES

    return any(p.name.lower().endswith(NIFTI_SUFFIXES + DICOM_SUFFIXES) for p in root.rglob("*"))


def read_mri_downstream(
    root: Path, image_size: int | None, *, on_error: str = "skip", **_
) -> Splits:
    found = _require(root, _bhuvaji(root), "mri", "pretraining")
    train_items, classes = _class_items(found / "Training")
    test_items, _ = _class_items(found / "Testing", classes=classes)
    return (
        _labelled(train_items, classes, True, image_size, on_error),
        _labelled(test_items, classes, True, image_size, on_error),
    )


BUSI_CLASSES = ("benign", "malignant", "normal")


def _busi(root: Path, image_size: int | None, on_error: str) -> Splits:
    wanted = _has_class_folders(BUSI_CLASSES)
    found = _require(
        root, _first_existing(root, (".", "Dataset_BUSI_with_GT"), wanted), "us", "pretraining"
    )
    items, classes = _class_items(found, exclude=_is_mask)
    return held_out_split(_labelled(items, classes, True, image_size, on_error))


def read_busi_pretraining(
    root: Path, image_size: int | None, *, on_error: str = "skip", **_
) -> Dataset:
    return _busi(root, image_size, on_error)[0]


def read_busi_downstream(
    root: Path, image_size: int | None, *, on_error: str = "skip", **_
) -> Splits:
    return _busi(root, image_size, on_error)


EUROSAT_CLASSES = (
    "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
    "PermanentCrop", "Residential", "River", "SeaLake",
)  # fmt: skip


def _eurosat(root: Path, image_size: int | None, on_error: str) -> Splits:
    wanted = _has_class_folders(EUROSAT_CLASSES)
    candidates = (".", "2750", "EuroSAT", "EuroSAT/2750", "EuroSAT_RGB")
    found = _require(root, _first_existing(root, candidates, wanted), "satellite", "pretraining")
    items, classes = _class_items(found)
    return held_out_split(_labelled(items, classes, False, image_size, on_error))


def read_eurosat_pretraining(
    root: Path, image_size: int | None, *, on_error: str = "skip", **_
) -> Dataset:
    return _eurosat(root, image_size, on_error)[0]


def read_eurosat_downstream(
    root: Path, image_size: int | None, *, on_error: str = "skip", **_
) -> Splits:
    return _eurosat(root, image_size, on_error)


# ----------------------------------------------------------------------------- natural scenes


def _tfds_pair(name, label_key, splits, root, image_size, gray, max_samples, override) -> Splits:
    from medp2x.data.tfds import TFDSDataset

    return tuple(
        TFDSDataset(
            name,
            split,
            root,
            label_key,
            gray=gray,
            image_size=image_size,
            resize=KEEP_SHAPE,
            max_samples=max_samples,
            override=override,
        )
        for split in splits
    )


def read_tfds_pretraining(
    root: Path, image_size: int | None, *, name: str, split: str = "train", max_samples=None, **_
) -> Dataset:
    from medp2x.data.tfds import TFDSDataset

    return TFDSDataset(
        name, split, root, label_key=None, image_size=image_size, max_samples=max_samples
    )


def read_tfds_downstream(
    root: Path,
    image_size: int | None,
    *,
    name: str,
    label_key: str,
    splits=("train", "test"),
    max_samples=None,
    **_,
) -> Splits:
    return _tfds_pair(name, label_key, splits, root, image_size, False, max_samples, "data_dir")


UTKFACE_CLASSES = {  # label index -> name, as the UTKFace page defines them
    "gender": ("male", "female"),
    "ethnicity": ("White", "Black", "Asian", "Indian", "Others"),
    "age": ("0-9", "10-19", "20-29", "30-39", "40-49", "50-59", "60+"),
}
UTKFACE_AGE_BINS = (10, 20, 30, 40, 50, 60)  # lower edges of the age classes after the first


def utkface_label(path: Path, target: str) -> int | None:
    """Label from UTKFace's ``<age>_<gender>_<race>_<date>.jpg.chip.jpg``; None when the name
    does not carry it (a few published files lack a field)."""
    parts = path.name.split("_")
    try:
        age, gender, race = int(parts[0]), int(parts[1]), int(parts[2])
    except (ValueError, IndexError):
        return None
    if target == "gender":
        return gender if gender in (0, 1) else None
    if target == "ethnicity":
        return race if 0 <= race <= 4 else None
    return int(np.searchsorted(UTKFACE_AGE_BINS, age, side="right"))


def read_utkface(
    root: Path, image_size: int | None, *, target: str = "ethnicity", on_error: str = "skip", **_
) -> Splits:
    """UTKFace aligned and cropped faces; ``target``: gender (2), ethnicity (5) or age (7 bins)."""
    if target not in UTKFACE_CLASSES:
        raise ValueError(
            f"UTKFace target must be one of {', '.join(UTKFACE_CLASSES)}, not {target!r}"
        )
    files = _image_files(root)
    if not files:
        raise FileNotFoundError(BENCHMARKS["celeba"].missing(BENCHMARKS["celeba"].downstream, root))
    labelled = [(f, utkface_label(f, target)) for f in files]
    unnamed = [f for f, label in labelled if label is None]
    if unnamed:
        logger.warning(
            "UTKFace: %d file(s) without a %s in their name skipped, e.g. %s",
            len(unnamed),
            target,
            unnamed[0],
        )
    items = [(f, label) for f, label in labelled if label is not None]
    classes = list(UTKFACE_CLASSES[target])
    return held_out_split(_labelled(items, classes, False, image_size, on_error))


def _aircraft_root(root: Path) -> Path:
    wanted = lambda p: (p / "images").is_dir() and (p / "images_variant_trainval.txt").is_file()  # noqa: E731
    candidates = (".", "data", "fgvc-aircraft-2013b/data")
    return _require(root, _first_existing(root, candidates, wanted), "aircraft", "pretraining")


def aircraft_items(
    data: Path, split: str, level: str = "variant"
) -> tuple[list[tuple[Path, int]], list[str]]:
    """(image, label) from ``images_<level>_<split>.txt`` (``<id> <name>`` lines); labels
    index the sorted ``<level>s.txt`` names (100 variants), or the names seen in trainval."""

    def read(name: str) -> list[tuple[str, str]]:
        path = data / f"images_{level}_{name}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"FGVC-Aircraft annotation {path} is missing")
        rows = [
            line.strip().split(" ", 1) for line in path.read_text().splitlines() if line.strip()
        ]
        bad = [r for r in rows if len(r) != 2]
        if bad:
            raise UnreadableFileError(
                path, f"expected '<image id> <{level}>' lines, got {bad[0]!r}"
            )
        return rows

    names_file = data / f"{level}s.txt"
    if names_file.is_file():
        classes = sorted(
            line.strip() for line in names_file.read_text().splitlines() if line.strip()
        )
    else:
        classes = sorted({name for _, name in read("trainval")})
    lookup = {name: i for i, name in enumerate(classes)}
    items = []
    for image_id, name in read(split):
        if name not in lookup:
            raise UnreadableFileError(
                data / f"images_{level}_{split}.txt", f"unknown {level} {name!r}"
            )
        items.append((data / "images" / f"{image_id}.jpg", lookup[name]))
    return items, classes


def read_aircraft_pretraining(
    root: Path, image_size: int | None, *, on_error: str = "skip", **_
) -> Dataset:
    items, classes = aircraft_items(_aircraft_root(root), "trainval")
    return _labelled(items, classes, False, image_size, on_error)


def read_aircraft_downstream(
    root: Path, image_size: int | None, *, on_error: str = "skip", **_
) -> Splits:
    data = _aircraft_root(root)
    return tuple(
        _labelled(*aircraft_items(data, split), False, image_size, on_error)
        for split in ("trainval", "test")
    )


# ----------------------------------------------------------------------------- the registry

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


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in [
        Benchmark(
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
        Benchmark(
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
        Benchmark(
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
        Benchmark(
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
        Benchmark(
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
        Benchmark(
            name="sop", title="SOP", modality="rgb",
            pretraining=_tfds_spec("stanford_online_products", "Stanford Online Products"),
            downstream=SAME_SET,
            num_classes=12, test_split=OFFICIAL,
            classes="super_class_id: 12 product categories (the 22,634 class_id products differ between train and test)",
            read_pretraining=partial(read_tfds_pretraining, name="stanford_online_products"),
            read_downstream=partial(read_tfds_downstream, name="stanford_online_products", label_key="super_class_id"),
        ),
        Benchmark(
            name="food", title="Food", modality="rgb",
            pretraining=_tfds_spec("food101", "Food-101"),
            downstream=SAME_SET,
            num_classes=101, classes="label: 101 dishes", test_split="the official train / validation split",
            read_pretraining=partial(read_tfds_pretraining, name="food101"),
            read_downstream=partial(read_tfds_downstream, name="food101", label_key="label", splits=("train", "validation")),
        ),
        Benchmark(
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
        Benchmark(
            name="cars", title="Cars", modality="rgb",
            pretraining=_tfds_spec("cars196", "Stanford Cars"),
            downstream=SAME_SET,
            num_classes=196, classes="label: 196 car models", test_split=OFFICIAL,
            read_pretraining=partial(read_tfds_pretraining, name="cars196"),
            read_downstream=partial(read_tfds_downstream, name="cars196", label_key="label"),
        ),
        Benchmark(
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


def get(name: str) -> Benchmark:
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise ValueError(
            f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}"
        ) from None


def _options(bench: Benchmark, given: Mapping[str, object] | None) -> dict:
    unknown = sorted(set(given or {}) - set(bench.options))
    if unknown:
        known = ", ".join(bench.options) or "none"
        raise ValueError(f"{bench.name}: unknown option(s) {', '.join(unknown)} (known: {known})")
    return {**bench.options, **(given or {})}


def _resolve(path: str | Path) -> Path:
    return Path(path).expanduser()


# ----------------------------------------------------------------------------- bundle entry points


class DatasetFactory:
    """``make_dataset(data_dir, image_size) -> Dataset`` of one benchmark's pretraining data
    (a class, so the hint below travels with it and it pickles for DataLoader workers)."""

    def __init__(self, bench: Benchmark, max_samples: int | None, on_error: str, options: dict):
        self.bench, self.max_samples, self.options = bench, max_samples, options
        self.on_error = check_on_error(on_error)
        self.missing_data_hint = bench.missing(bench.pretraining, None)

    def __call__(self, data_dir: str | Path, image_size: int | None) -> Dataset:
        root = _resolve(data_dir)
        if not root.exists():
            raise FileNotFoundError(self.bench.missing(self.bench.pretraining, root))
        kwargs = {"on_error": self.on_error, "max_samples": self.max_samples, **self.options}
        dataset = self.bench.read_pretraining(root, image_size, **kwargs)
        return limit(dataset, self.max_samples)


def dataset_factory(
    benchmark: str, max_samples: int | None = None, on_error: str = "skip", **options
) -> DatasetFactory:
    """The pretraining reader of ``benchmark``, for ``P2XJob.make_dataset``."""
    bench = get(benchmark)
    return DatasetFactory(bench, max_samples, on_error, _options(bench, options))


class EvalDataFactory:
    """``make_eval_data() -> (train, test)`` of one benchmark's downstream task."""

    def __init__(self, bench: Benchmark, root: Path, image_size, max_samples, on_error, options):
        self.bench, self.root, self.image_size = bench, root, image_size
        self.dropped: dict[str, list] = {}  # per split: (file, reason) left out
        self.max_samples, self.on_error, self.options = (
            max_samples,
            check_on_error(on_error),
            options,
        )

    def __call__(self) -> Splits:
        """(train, test). In skip mode every sample of both splits is read once here and each
        unreadable file is dropped from its own split (``self.dropped``): a bad test image is
        never replaced by a training image with its label, as the reader's own stand-in would."""
        if not self.root.exists():
            raise FileNotFoundError(self.bench.missing(self.bench.downstream, self.root))
        kwargs = {"on_error": self.on_error, "max_samples": self.max_samples, **self.options}
        train, test = self.bench.read_downstream(self.root, self.image_size, **kwargs)
        train, test = limit(train, self.max_samples), limit(test, self.max_samples)
        if self.on_error == "skip":
            train, test = drop_unreadable(train), drop_unreadable(test)
        self.dropped = {name: list(getattr(split, "dropped", [])) for name, split in
                        (("train", train), ("test", test))}  # fmt: skip
        return train, test


def eval_data_factory(
    benchmark: str,
    downstream_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    image_size: int | None = None,
    max_samples: int | None = None,
    on_error: str = "skip",
    **options,
) -> EvalDataFactory | None:
    """The downstream reader of ``benchmark``, for ``P2XJob.make_eval_data``.

    Same-set benchmarks read ``downstream_dir or data_dir``; the others (Histo: PCam, Xray:
    COVID-19 radiography, CelebA: UTKFace) need ``downstream_dir`` and return None without
    it, so a job falls back to its ``eval_dir`` (or the demo's labelled tiles) or skips.
    """
    bench = get(benchmark)
    options = _options(bench, options)
    root = downstream_dir or (data_dir if bench.same_set else None)
    if root is None:
        if data_dir is not None:
            print(
                f"[note] {bench.name}: no --downstream_dir ({bench.downstream.what}, from {bench.downstream.obtain}): no benchmark evaluation"
            )
        return None
    return EvalDataFactory(bench, _resolve(root), image_size, max_samples, on_error, options)
