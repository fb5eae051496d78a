"""Every docstring example in the package runs (doctest), except those marked ``+SKIP``.

Examples that need a profile file, a Ray session or minutes of training are skipped in place;
everything else is executed, so an example cannot drift from the code it documents.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch

import prunetune

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(prunetune.__path__, prefix="prunetune.")
    if not info.name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    torch.manual_seed(0)
    module = importlib.import_module(name)
    failures, _ = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert failures == 0, f"{failures} docstring example(s) of {name} failed (see output above)"


def test_the_examples_are_found() -> None:
    finder = doctest.DocTestFinder()
    examples = sum(
        len(test.examples)
        for name in MODULES
        for test in finder.find(importlib.import_module(name))
    )
    assert examples >= 30, f"only {examples} docstring examples found: is the walk broken?"
