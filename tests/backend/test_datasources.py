"""Data from anywhere: an image folder of PNG files, a factory, split objects; bad data refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prunetune.backend.datasources import DataSource, splits_from_objects
from prunetune.backend.errors import DataError
from prunetune.backend.training import batches
from tests import factories


def write_image_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 4,
                       splits: tuple[str, ...] = ("train", "val", "test")) -> Path:  # fmt: skip
    """``root/<split>/<class>/<i>.png``: 12 x 12 RGB images, one bright channel per class."""
    rng = np.random.default_rng(0)
    for split in splits:
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 60, (12, 12, 3), dtype=np.uint8)
                pixels[..., index % 3] += 150
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_an_image_folder_streams_transformed_batches(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "pets")
    data = DataSource("imagefolder", root=str(root), image_size=8, workers=0).check()
    assert data.num_classes == 2 and data.image_shape == (3, 8, 8)
    assert data.summary().startswith("imagefolder: 8 train / 8 val / 8 test, images 3x8x8")
    x, y = next(iter(batches(data.train, 4, shuffle=True, workers=data.workers)))
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_an_image_folder_without_test_uses_val(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "pets", splits=("train", "val"))
    data = DataSource("imagefolder", root=str(root), image_size=8, workers=0).check()
    assert data.test is data.val


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda r: __import__("shutil").rmtree(r / "val"), r"has no val/ folder; expected train/"),
        (lambda r: (r / "train" / "empty").mkdir(), r"class folder '.*empty' holds no images"),
        (
            lambda r: (r / "val" / "cat" / "9.png").write_bytes(b"not a png"),
            r"cannot read image '.*9\.png': UnidentifiedImageError",
        ),
        (
            lambda r: __import__("shutil").rmtree(r / "val" / "dog"),
            r"the splits' classes differ \(2 / 1 / 2 classes\)",
        ),
    ],
    ids=["missing split", "empty class", "unreadable image", "mismatched classes"],
)
def test_bad_image_folders_are_one_clear_line(tmp_path: Path, damage, message: str) -> None:  # type: ignore[no-untyped-def]
    root = write_image_folder(tmp_path / "pets")
    damage(root)
    with pytest.raises(DataError, match=message):
        DataSource("imagefolder", root=str(root), image_size=8, workers=0).check()


def test_a_factory_and_split_objects_give_the_same_splits() -> None:
    data = DataSource("tests.factories:digits_datasets", workers=0).check()
    assert data.num_classes == 10 and data.image_shape == (1, 8, 8)
    objects = factories.digits_datasets()
    same = splits_from_objects((objects["train"], objects["val"]), "the data given")
    assert len(same.train) == len(data.train) and same.test is same.val


def test_bad_factories_and_names_are_refused() -> None:
    with pytest.raises(DataError, match="has no 'val' split; give train and val"):
        DataSource("tests.factories:train_only").load()
    with pytest.raises(DataError, match=r"cannot import dataset factory 'tests\.factories:nope'"):
        DataSource("tests.factories:nope").load()
    with pytest.raises(DataError, match="unknown dataset 'imagenet'; valid: digits, mnist"):
        DataSource("imagenet")
    with pytest.raises(DataError, match="must give the splits as"):
        splits_from_objects(42, "the data given")
