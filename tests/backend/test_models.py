"""The zoo: every model builds by name, has the right output shape and trains on digits."""

from __future__ import annotations

import pytest
import torch

from prunetune.backend.data import DatasetSplits
from prunetune.backend.errors import UnsupportedModelError
from prunetune.backend.models import ModelRef, create_model, dataset_kwargs, list_models
from prunetune.backend.train import TrainConfig, train

ZOO = ("mobilenetv2", "resnet20", "resnet32", "resnet56", "small_cnn", "vgg16_bn")


def test_zoo_lists_every_model() -> None:
    assert set(ZOO) <= set(list_models())


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize(("in_channels", "size", "classes"), [(3, 32, 10), (1, 28, 7)])
def test_output_shape(name: str, in_channels: int, size: int, classes: int) -> None:
    model = create_model(name, num_classes=classes, in_channels=in_channels).eval()
    assert model(torch.randn(2, in_channels, size, size)).shape == (2, classes)


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_trains_one_epoch_on_digits(name: str, digits: DatasetSplits) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=digits.num_classes, in_channels=digits.in_channels)
    losses: list[float] = []
    config = TrainConfig(epochs=1, lr=0.05, batch_size=64)
    result = train(model, digits, config, on_step=lambda step, total, loss: losses.append(loss))
    assert len(result.history) == 1 and len(losses) == 21
    assert model(digits.val.x[:5]).shape == (5, 10)
    assert sum(losses[-5:]) < sum(losses[:5])  # it learned something


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(UnsupportedModelError, match=r"unknown model 'resnet9'.*resnet20"):
        create_model("resnet9")


def test_user_factory_by_import_path() -> None:
    model = create_model("tests.backend.test_models:tiny_factory", width=4)
    assert isinstance(model, torch.nn.Sequential)
    assert dataset_kwargs("tests.backend.test_models:tiny_factory", 10, 1) == {}
    ref = ModelRef("tests.backend.test_models:tiny_factory", {"width": 4})
    assert ModelRef.from_dict(ref.to_dict()) == ref


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("tests.backend.no_such_module:f", "cannot import module"),
        ("tests.backend.test_models:missing", "has no callable 'missing'"),
        ("tests.backend.test_models:not_a_module", "not a torch.nn.Module"),
        (":f", "package.module:factory"),
    ],
)
def test_bad_user_factory(path: str, message: str) -> None:
    with pytest.raises(UnsupportedModelError, match=message):
        create_model(path)


def test_rejects_unknown_keyword() -> None:
    with pytest.raises(UnsupportedModelError, match="does not take depth"):
        create_model("resnet20", depth=3)


def tiny_factory(width: int = 2) -> torch.nn.Module:
    """A user factory that takes neither num_classes nor in_channels."""
    return torch.nn.Sequential(torch.nn.Conv2d(1, width, 3), torch.nn.ReLU())


def not_a_module() -> int:
    return 3


def test_a_missing_torchvision_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision now fails
    with pytest.raises(UnsupportedModelError, match=r"pip install 'prunetune\[vision\]'"):
        create_model("torchvision.models:resnet18")


def test_torchvision_builders_get_num_classes_alone() -> None:
    pytest.importorskip("torchvision")
    kwargs = dataset_kwargs("torchvision.models:resnet18", 7, 1)
    assert kwargs == {"num_classes": 7}
    assert create_model("torchvision.models:resnet18", **kwargs).fc.out_features == 7
