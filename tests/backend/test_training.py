"""The training toolkit: device and precision plumbing, optimiser set-up, BN handling, metrics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from prunetune.backend.data import DatasetSplits
from prunetune.backend.errors import DeviceError, TrainingError
from prunetune.backend.train import TrainConfig, train
from prunetune.backend.training import (
    MeanIoU,
    Optimization,
    PixelAccuracy,
    Runtime,
    Stepper,
    Task,
    batches,
    endless,
    evaluate,
    frozen_bn,
    recalibrate_bn,
    select_output,
    sgd,
)
from tests import factories


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10),
    )  # fmt: skip


def test_sgd_puts_no_weight_decay_on_norms_and_biases() -> None:
    model = _net()
    optimizer = sgd(model, Optimization(lr=0.1, weight_decay=1e-3))
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 1e-3 and plain["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"])
    assert {p.ndim for p in plain["params"]} == {1}  # BN weight/bias and every bias
    assert optimizer.defaults["nesterov"]


def test_frozen_bn_keeps_running_statistics_and_restores_modes() -> None:
    model = _net().eval()
    norm = model[1]
    before = norm.running_mean.clone()
    with frozen_bn(model, batch_statistics=True):
        assert norm.training and norm.momentum == 0.0
        model(torch.randn(8, 1, 8, 8) + 3.0)
    assert torch.equal(norm.running_mean, before)
    assert not norm.training and norm.momentum == 0.1


def test_recalibrate_bn_averages_fresh_statistics(digits: DatasetSplits) -> None:
    model = _net()
    model[1].running_mean.fill_(100.0)
    recalibrate_bn(model, digits.train, batches_count=1, batch_size=len(digits.train))
    features = model[0](digits.train.x)
    assert torch.allclose(model[1].running_mean, features.mean((0, 2, 3)), atol=1e-5)
    assert model[1].momentum == 0.1 and model.training


def test_a_non_finite_loss_stops_training_naming_the_step() -> None:
    model = _net()
    stepper = Stepper(model, sgd(model, Optimization(lr=0.1)))
    stepper.step(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(TrainingError, match=r"became nan at step 2 .*lower the learning rate"):
        stepper.step(torch.full((4, 1, 8, 8), math.nan), torch.tensor([0, 1, 2, 3]))


def test_training_diverging_with_a_huge_lr_is_a_clear_error(digits: DatasetSplits) -> None:
    torch.manual_seed(0)
    with pytest.raises(TrainingError, match="training diverged"):
        train(_net(), digits, TrainConfig(epochs=2, lr=1e12, batch_size=64))


def test_device_names_are_checked() -> None:
    with pytest.raises(ValueError, match="must be auto, cpu, cuda or cuda:<index>, got 'gpu'"):
        Runtime(device="gpu")
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16"):
        Runtime(precision="fp8")  # type: ignore[arg-type]
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert Runtime(device="auto").torch_device.type == expected


class _WiderThanMemory(nn.Module):
    """Runs out of device memory on batches above ``fits`` examples, like a wide net on a GPU."""

    def __init__(self, fits: int) -> None:
        super().__init__()
        self.body, self.fits = _net(), fits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return self.body(x)


def test_running_out_of_device_memory_is_a_clear_error_naming_the_fix(
    digits: DatasetSplits,
) -> None:
    model = _WiderThanMemory(fits=16)
    with pytest.raises(
        DeviceError,
        match=r"a training step on a batch of 64 does not fit in the "
        r"memory of cpu \(CUDA out of memory.*lower --batch-size.*--device cpu",
    ):
        train(model, digits, TrainConfig(epochs=1, batch_size=64))
    with pytest.raises(DeviceError, match=r"evaluation at batch size 512 does not fit"):
        evaluate(model, digits.val)
    stepper = Stepper(model, sgd(model, Optimization(lr=0.1)))  # a batch that fits trains
    assert math.isfinite(stepper.step(digits.train.x[:16], digits.train.y[:16])[0])
    assert 0.0 <= evaluate(model, digits.val, batch_size=16)[1] <= 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(DeviceError, match="torch sees no CUDA GPU here; use --device cpu or auto"):
        _ = Runtime(device="cuda:0").torch_device


def test_bf16_autocast_and_channels_last_train_on_the_cpu(digits: DatasetSplits) -> None:
    runtime = Runtime(device="cpu", precision="bf16", channels_last=True)
    model = _net()
    torch.manual_seed(0)
    result = train(model, digits, TrainConfig(epochs=3, lr=0.1, batch_size=64), runtime=runtime)
    losses = [report.train_loss for report in result.history]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    x, _ = runtime.batch(digits.val.x[:4], digits.val.y[:4])
    assert x.is_contiguous(memory_format=torch.channels_last)
    with runtime.autocast():
        assert model(x).dtype == torch.bfloat16
    assert Runtime(precision="fp16").scaler().is_enabled() is False  # fp16 scaling is CUDA's


def test_outputs_are_selected_by_key_or_index() -> None:
    out, aux = torch.zeros(2, 3), torch.ones(2, 3)
    assert select_output({"out": out, "aux": aux}, None) is out
    assert select_output({"out": out, "aux": aux}, "aux") is aux
    assert select_output((out, aux), 1) is aux
    with pytest.raises(TrainingError, match=r"returns a dict with 'out', 'aux'; name the output"):
        select_output({"out": out, "aux": aux}, "logits")
    with pytest.raises(TrainingError, match="returns 2 outputs; --output must be an index below 2"):
        select_output((out, aux), 5)


def test_dense_metrics_skip_the_ignore_index() -> None:
    targets = torch.tensor([[[0, 1], [1, 255]]])  # 1 x 2 x 2, one pixel ignored
    outputs = torch.zeros(1, 2, 2, 2)
    outputs[0, 0, 0, 0] = outputs[0, 1, 0, 1] = outputs[0, 0, 1, 0] = 1.0  # predicts 0, 1, 0, *
    iou, pixels = MeanIoU(255), PixelAccuracy(255)
    for metric in (iou, pixels):
        metric.update(outputs, targets)
    assert pixels.compute() == pytest.approx(2 / 3)
    assert iou.compute() == pytest.approx((1 / 2 + 1 / 2) / 2)  # class 0: 1/2, class 1: 1/2


def test_user_loss_and_metric_are_used_by_evaluate(digits: DatasetSplits) -> None:
    task = Task(loss=lambda out, y: out.sum() * 0, metric=factories.Top2)
    assert task.metric_name == "top2"
    loss, top2 = evaluate(_net(), digits.val, task)
    assert loss == 0.0 and 0.0 <= top2 <= 1.0
    with pytest.raises(TrainingError, match="must make an object with a name"):
        Task(metric=object).new_metric()  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="metric must be one of top1, miou, pixel_acc"):
        Task(metric="f1")  # type: ignore[arg-type]


def test_endless_batches_reshuffle_every_pass(digits: DatasetSplits) -> None:
    loader = batches(digits.val.subset(10), 10, shuffle=True, seed=0)
    first, second = (y for _, y in endless(loader)), None
    a, b = next(first), next(first)
    second = b
    assert sorted(a.tolist()) == sorted(second.tolist()) and not torch.equal(a, second)
