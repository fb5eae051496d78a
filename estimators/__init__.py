"""Cost estimators of subnets: exact FLOPs and parameters, latency from measured device tables.

Every estimator is a :class:`CostModel` built once per traced graph; it evaluates integer widths
exactly (one candidate or thousands at once) and keep ratios differentiably (``relaxed``).
"""

from prunetune.estimators._cost import CostModel, FlopsModel, ParamsModel, QuadraticForm
from prunetune.estimators._groups import GraphLike, HasWidths, WidthsLike, graph_fingerprint
from prunetune.estimators._latency import Calibration, LatencyPredictor, cost_models
from prunetune.estimators._profile import (
    DeviceInfo,
    LatencyProfile,
    LatencyTable,
    ProfileError,
    ProfileMismatchWarning,
)
from prunetune.estimators._profiling import (
    ProfileProgress,
    calibration_widths,
    cpu_channel_block,
    profile_model,
    recalibrate_profile,
)
from prunetune.estimators._proxy import proxy_accuracy, recalibrate_bn
from prunetune.estimators._targets import (
    METRICS,
    Budget,
    Constraint,
    Target,
    format_metric,
    format_share,
)
from prunetune.estimators._timing import measure_latencies, measure_latency, steady_allocator

__all__ = [
    "METRICS",
    "Budget",
    "Calibration",
    "Constraint",
    "CostModel",
    "DeviceInfo",
    "FlopsModel",
    "GraphLike",
    "HasWidths",
    "LatencyPredictor",
    "LatencyProfile",
    "LatencyTable",
    "ParamsModel",
    "ProfileError",
    "ProfileMismatchWarning",
    "ProfileProgress",
    "QuadraticForm",
    "Target",
    "WidthsLike",
    "calibration_widths",
    "cost_models",
    "cpu_channel_block",
    "format_metric",
    "format_share",
    "graph_fingerprint",
    "measure_latencies",
    "measure_latency",
    "profile_model",
    "proxy_accuracy",
    "recalibrate_bn",
    "recalibrate_profile",
    "steady_allocator",
]
