"""Data from anywhere: the built-ins, an image folder, a factory, or Dataset objects from Python.

A :class:`DataSource` is a small picklable description; every process (the driver and each Ray
trial) calls :meth:`DataSource.load` to build its own splits and loaders from it. The built-ins
(``digits``, ``mnist``, ``cifar10``) keep their in-memory path; the rest are ``Dataset`` objects
streamed by ``DataLoader`` workers. :meth:`DataSource.check` refuses bad data (a missing split,
an empty class folder, an unreadable image, splits whose classes differ) with one line, before
any training.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunetune.backend.data import DATASETS, DatasetSplits, Split, load_dataset, split_length
from prunetune.backend.errors import DataError

__all__ = [
    "IMAGEFOLDER",
    "PYTHON",
    "DataSource",
    "import_callable",
    "is_data_name",
    "splits_from_objects",
]

IMAGEFOLDER = "imagefolder"
PYTHON = "python"
"""The name of data given as objects (``run_search(..., data=...)``)."""
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".tif", ".tiff", ".webp")
# torchvision's ImageNet statistics: the usual normalisation of image folders
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def is_data_name(name: str) -> bool:
    """Whether ``name`` names data: a built-in, ``imagefolder``, ``python`` or a factory."""
    module, sep, attribute = name.partition(":")
    return name in (*DATASETS, IMAGEFOLDER, PYTHON) or bool(sep and module and attribute)


@dataclass(frozen=True)
class DataSource:
    """Where the data comes from; picklable, so Ray trials load their own copy.

    Attributes:
        name: ``digits``, ``mnist``, ``cifar10`` (in memory), ``imagefolder`` (``root`` holds
            ``train/``, ``val/`` and optionally ``test/`` folders of class folders),
            ``package.module:factory`` (called as ``factory(root=root)`` when ``root`` is set,
            else ``factory()``; it returns the splits as a mapping ``{"train", "val"[, "test"],
            "num_classes"}`` of ``Dataset``/``DataLoader`` objects, a ``(train, val[, test])``
            tuple, or a :class:`DatasetSplits`), or ``python`` (``objects``).
        root: the data directory (built-ins and ``imagefolder``; a factory's argument).
        seed: the built-ins' split seed and the loaders' shuffle seed.
        image_size: ``imagefolder``: the side images are cropped to (pixels).
        workers: ``DataLoader`` worker processes per loader for streamed data.
        objects: ``python``: the splits as a factory would return them.
    """

    name: str = "digits"
    root: str | None = None
    seed: int = 0
    image_size: int = 224
    workers: int = 2
    objects: Any = None

    def __post_init__(self) -> None:
        if not is_data_name(self.name):
            raise DataError(
                f"unknown dataset {self.name!r}; valid: {', '.join(DATASETS)}, {IMAGEFOLDER} "
                "(with --data-dir) or package.module:factory"
            )
        if self.image_size < 1:
            raise ValueError(f"image_size must be at least 1, got {self.image_size}")
        if self.workers < 0:
            raise ValueError(f"workers must be at least 0, got {self.workers}")
        if self.name == PYTHON and self.objects is None:
            raise DataError("data 'python' needs the split objects (run_search(data=...))")

    def load(self) -> DatasetSplits:
        """Build the splits (and so, through them, the loaders) in this process.

        Raises:
            DataError: the data is missing or malformed (one line saying what and where).
        """
        if self.name in DATASETS:
            return load_dataset(self.name, root=self.root, seed=self.seed)
        if self.name == IMAGEFOLDER:
            return _image_folder(self)
        if self.name == PYTHON:
            return splits_from_objects(self.objects, "the data given", self.workers)
        factory = _import_factory(self.name)
        try:
            made = factory(root=self.root) if self.root is not None else factory()
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"dataset factory {self.name!r} raised {_one_line(exc)}") from exc
        return splits_from_objects(made, f"dataset factory {self.name!r}", self.workers, self.name)

    def check(self) -> DatasetSplits:
        """:meth:`load`, then read one example of every split (and, for an image folder,
        open every image), so bad data fails here and not in a trial.

        Raises:
            DataError: see :meth:`load`; an example that cannot be read.
        """
        splits = self.load()
        for part in ("train", "val", "test"):
            split = getattr(splits, part)
            if split_length(split) == 0:
                raise DataError(f"{splits.name}: the {part} split is empty")
            if isinstance(split, Split):
                continue  # in memory: read and checked already
            try:
                example = _first(split)
            except DataError:
                raise
            except Exception as exc:
                raise DataError(
                    f"{splits.name}: cannot read the first {part} example: {_one_line(exc)}"
                ) from exc
            if not isinstance(example, (tuple, list)) or len(example) < 2:
                raise DataError(
                    f"{splits.name}: {part} examples must be (input, target) pairs, got "
                    f"{type(example).__name__}"
                )
        return splits


def splits_from_objects(
    made: Any, origin: str, workers: int = 0, name: str = PYTHON
) -> DatasetSplits:
    """The splits a factory or the Python API gave: a mapping, a tuple or DatasetSplits.

    Raises:
        DataError: no ``train`` or ``val`` split, or splits whose class lists differ.
    """
    if isinstance(made, DatasetSplits):
        return made
    if isinstance(made, Mapping):
        parts = dict(made)
    elif isinstance(made, Sequence) and not isinstance(made, str) and 2 <= len(made) <= 3:
        parts = dict(zip(("train", "val", "test"), made, strict=False))
    else:
        raise DataError(
            f"{origin} must give the splits as {{'train': ..., 'val': ..., 'test': ...}} or "
            f"(train, val[, test]), got {type(made).__name__}"
        )
    missing = [p for p in ("train", "val") if parts.get(p) is None]
    if missing:
        raise DataError(f"{origin} has no {missing[0]!r} split; give train and val (test optional)")
    train, val = parts["train"], parts["val"]
    test = parts.get("test") if parts.get("test") is not None else val
    classes = [_classes(split) for split in (train, val, test)]
    known = [c for c in classes if c is not None]
    if any(c != known[0] for c in known):
        raise DataError(
            f"{origin}: the splits' classes differ ({' / '.join(str(len(c)) for c in known)} "
            "classes); every split must have the same class list"
        )
    num_classes = parts.get("num_classes") or (len(known[0]) if known else 0)
    return DatasetSplits(
        name=name, train=train, val=val, test=test, num_classes=int(num_classes), workers=workers
    )


def _classes(split: Any) -> list[str] | None:
    dataset = getattr(split, "dataset", split)
    classes = getattr(dataset, "classes", None)
    return list(classes) if classes is not None else None


def _first(split: Any) -> Any:
    if hasattr(split, "batch_size") and hasattr(split, "dataset"):  # a DataLoader
        return next(iter(split))
    return split[0]


def import_callable(spec: str, what: str) -> Callable[..., Any]:
    """The callable ``package.module:name`` names (a factory, a loss, a metric class).

    Raises:
        ValueError: not of that form, not importable, or not callable; names ``what``.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"{what} must be package.module:name, got {spec!r}")
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import {what} {spec!r}: {_one_line(exc)}") from exc
    if not callable(found):
        raise ValueError(f"{what} {spec!r} is not callable")
    return found  # type: ignore[no-any-return]


def _import_factory(spec: str) -> Callable[..., Any]:
    try:
        return import_callable(spec, "dataset factory")
    except ValueError as exc:
        raise DataError(str(exc)) from exc


def _image_folder(source: DataSource) -> DatasetSplits:
    """torchvision ``ImageFolder`` splits with the usual transforms; every image opened once."""
    if source.root is None:
        raise DataError("dataset 'imagefolder' needs its directory: pass --data-dir DIR")
    root = Path(source.root)
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist")
    try:
        from torchvision import datasets, transforms
    except ImportError as exc:
        raise DataError(
            "dataset 'imagefolder' needs torchvision: pip install 'prunetune[vision]'"
        ) from exc
    size = source.image_size
    normalise = [transforms.ToTensor(), transforms.Normalize(_MEAN, _STD)]
    train_tf = transforms.Compose(
        [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), *normalise]
    )
    eval_tf = transforms.Compose(
        [transforms.Resize(max(size, round(size * 8 / 7))), transforms.CenterCrop(size), *normalise]
    )
    parts: dict[str, Any] = {}
    for part in ("train", "val", "test"):
        directory = root / part
        if not directory.is_dir():
            if part == "test":
                continue
            raise DataError(
                f"image folder {str(root)!r} has no {part}/ folder; expected train/ and val/ "
                "(and optionally test/), each with one folder of images per class"
            )
        _check_image_folder(directory)
        parts[part] = datasets.ImageFolder(
            str(directory), transform=train_tf if part == "train" else eval_tf
        )
    splits = splits_from_objects(parts, f"image folder {str(root)!r}", source.workers)
    return DatasetSplits(
        name=IMAGEFOLDER,
        train=splits.train,
        val=splits.val,
        test=splits.test,
        num_classes=splits.num_classes,
        workers=source.workers,
    )


def _check_image_folder(directory: Path) -> None:
    """Every class folder holds images, and every image's header reads.

    Raises:
        DataError: no class folders, an empty one, or a file PIL cannot open.
    """
    from PIL import Image, UnidentifiedImageError

    classes = sorted(p for p in directory.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{str(directory)!r} has no class folders (one folder of images per class)")
    for folder in classes:
        images = [p for p in sorted(folder.rglob("*")) if p.suffix.lower() in _IMAGE_SUFFIXES]
        if not images:
            raise DataError(f"class folder {str(folder)!r} holds no images")
        for path in images:
            try:
                with Image.open(path) as image:
                    image.verify()
            except (OSError, UnidentifiedImageError, SyntaxError) as exc:
                raise DataError(f"cannot read image {str(path)!r}: {_one_line(exc)}") from exc


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
