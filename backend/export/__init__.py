"""Export a pruned subnet to a directory, check it, and rebuild it from there.

An export directory holds:

- ``subnet.json``: the :class:`SubnetSpec` (model identity, input shape, kept channels), metrics
  (``flops``, ``params`` measured on the exported model, plus whatever the caller adds; a
  non-finite figure is written as ``null``: strict JSON), the SHA-256 of every other file and
  a ``checksum`` of its own content;
- ``weights.pt``: the pruned model's state_dict;
- ``model.pt2``: the ``torch.export`` program (batch dimension dynamic);
- ``model.onnx``: the ONNX graph (batch dimension dynamic), written by torch's TorchScript
  exporter or, where that fails on an op, by its dynamo exporter. When neither can write the
  model, the other files are still written and ``subnet.json`` says under ``missing_formats``
  that ONNX is missing and why.

Export runs the model, the exported program and onnxruntime on the same input and refuses to
leave a directory behind when they disagree by more than the tolerance or compute anything
non-finite. Loading verifies every checksum first and never imports a model reference read from
the files unless it names a zoo model or the model the caller gave (or the caller trusts it).
The directory is written atomically: a failed export leaves nothing (or the previous export)
in place.
"""

from prunetune.backend.export._load import (
    ExportedProgramModule,
    LoadedModel,
    load_export,
    load_model,
    load_subnet,
)
from prunetune.backend.export._record import (
    EXPORT_FORMAT,
    ExportParityError,
    output_tensors,
    seal_record,
)
from prunetune.backend.export._write import Normalize, check_export_dir, export_subnet

__all__ = [
    "EXPORT_FORMAT",
    "ExportParityError",
    "ExportedProgramModule",
    "LoadedModel",
    "Normalize",
    "check_export_dir",
    "export_subnet",
    "load_export",
    "load_model",
    "load_subnet",
    "output_tensors",
    "seal_record",
]
