"""The model zoo: CIFAR ResNet-20/32/56, VGG-16-BN, MobileNetV2 and a small CNN, by name."""

from prunetune.backend.models import _mobilenet, _resnet, _small, _vgg  # noqa: F401  (they register)
from prunetune.backend.models._registry import (
    ModelRef,
    create_model,
    dataset_kwargs,
    list_models,
    register_model,
)

__all__ = ["ModelRef", "create_model", "dataset_kwargs", "list_models", "register_model"]
