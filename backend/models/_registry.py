"""The model zoo's registry: models are picked by name, or given as ``package.module:factory``."""

from __future__ import annotations

import importlib
import inspect
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from prunetune.backend.errors import UnsupportedModelError

ModelFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, ModelFactory] = {}

INSTANCE_PREFIX = "instance:"
"""Names of :class:`ModelRef` s that record a module object's class; they cannot be rebuilt."""

TRUST_FLAG = "--trust-model-code"
"""The command-line opt-in that lets a file's model reference be imported (``trust_model_code``
in Python), in the spirit of ``trust_remote_code``."""


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register a factory under ``name``; the factory takes ``num_classes`` and ``in_channels``.

    Example:
        >>> @register_model("tiny")  # doctest: +SKIP
        ... def tiny(num_classes: int = 10, in_channels: int = 3) -> nn.Module: ...
    """

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def list_models() -> list[str]:
    """Return the names of the zoo's models, sorted."""
    return sorted(_REGISTRY)


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from: a zoo name or ``package.module:factory``, and its arguments.

    It is the model's identity in checkpoints and exports, so it must stay JSON-serialisable.
    A model given as an ``nn.Module`` object has the reference :meth:`for_instance`, which names
    its class for the reader but cannot be rebuilt (:attr:`buildable` is false).
    """

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form ``{"name": ..., "kwargs": {...}}``."""
        return {"name": self.name, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, data: Any) -> ModelRef:
        """Parse the JSON form written by :meth:`to_dict`.

        Raises:
            ValueError: ``data`` is not of that form.
        """
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            raise ValueError(f"a model reference needs a 'name' string, got {data!r}")
        kwargs = data.get("kwargs", {})
        if not isinstance(kwargs, dict):
            raise ValueError(f"a model reference's 'kwargs' must be an object, got {kwargs!r}")
        return cls(name=data["name"], kwargs=dict(kwargs))

    @classmethod
    def for_instance(cls, model: nn.Module) -> ModelRef:
        """The identity of a module object: ``instance:package.module.ClassName``."""
        kind = type(model)
        return cls(f"{INSTANCE_PREFIX}{kind.__module__}.{kind.__qualname__}")

    @property
    def buildable(self) -> bool:
        """Whether :meth:`build` can construct the model (a zoo name or a factory path)."""
        return not self.name.startswith(INSTANCE_PREFIX)

    @property
    def is_zoo(self) -> bool:
        """Whether the name is one of the zoo's models (needs no import of user code)."""
        return self.name in _REGISTRY

    def check_trusted(
        self, source: str, given: ModelRef | str | None = None, trust_model_code: bool = False
    ) -> None:
        """Refuse to build a reference read from a file unless building it runs no foreign code.

        A reference read from a checkpoint or an export may name a zoo model, or the model the
        user gave (``--model`` on the command line, ``model=`` in Python); anything else would
        import and call code the file chose, so it needs ``trust_model_code``.

        Args:
            source: the file the reference was read from, for the message.
            given: the model reference (or name) the user gave, if any.
            trust_model_code: the explicit opt-in to import whatever the file names.

        Raises:
            UnsupportedModelError: the reference names code the user did not ask for.
        """
        given_name = given.name if isinstance(given, ModelRef) else given
        if self.is_zoo or not self.buildable or trust_model_code or self.name == given_name:
            return
        raise UnsupportedModelError(
            f"{source!r} names model {self.name!r}, which is not in the zoo: loading it would "
            f"import and run that code; pass --model {self.name} (model= in Python) if you "
            f"trust it, or {TRUST_FLAG} (trust_model_code=True)"
        )

    def build(self) -> nn.Module:
        """Construct the (dense, freshly initialised) model.

        Raises:
            UnsupportedModelError: the reference records a module object (it has no factory),
                or see :func:`create_model`.
        """
        if not self.buildable:
            raise UnsupportedModelError(
                f"model {self.name.removeprefix(INSTANCE_PREFIX)!r} was given as a module object "
                "and cannot be rebuilt from its name; pass the module itself (from Python: "
                "prunetune.load(directory, model=...)), or load the export's own program"
            )
        return create_model(self.name, **self.kwargs)


def _import_factory(path: str) -> ModelFactory:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise UnsupportedModelError(
            f"user model {path!r} must be written as package.module:factory"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = (
            "install it with pip install 'prunetune[vision]'"
            if module_name.split(".")[0] == "torchvision"
            else "make sure it is installed or on PYTHONPATH"
        )
        raise UnsupportedModelError(
            f"cannot import module {module_name!r} for user model {path!r}: {exc}; {hint}"
        ) from exc
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise UnsupportedModelError(
            f"module {module_name!r} has no callable {attr!r} (from user model {path!r})"
        )
    _check_factory(factory, path)
    return factory  # type: ignore[no-any-return]


def _check_factory(factory: Any, path: str) -> None:
    """Refuse, without calling it, anything that is not a Python model factory.

    A factory is a subclass of ``nn.Module`` or a function written in Python (not a builtin, not
    from the standard library) whose return annotation, if any, is an ``nn.Module``.

    Raises:
        UnsupportedModelError: ``factory`` cannot be a model factory.
    """
    if inspect.isclass(factory):
        if not issubclass(factory, nn.Module):
            raise UnsupportedModelError(
                f"user model {path!r} is the class {factory.__name__}, not a torch.nn.Module "
                "subclass; name a module class or a function returning a module"
            )
        return
    if not inspect.isfunction(factory):
        raise UnsupportedModelError(
            f"user model {path!r} is a {type(factory).__name__}, not a Python function or "
            "torch.nn.Module class; name a factory written in Python that returns a module"
        )
    top = str(getattr(factory, "__module__", "") or "").partition(".")[0]
    if top in sys.stdlib_module_names:
        raise UnsupportedModelError(
            f"user model {path!r} is a function of the standard library ({top}), not a model "
            "factory; name a function returning a torch.nn.Module"
        )
    try:
        returns = typing.get_type_hints(factory).get("return", inspect.Signature.empty)
    except Exception:  # unresolvable annotations: the result is checked after the call
        returns = inspect.Signature.empty
    if returns is inspect.Signature.empty or returns is typing.Any:
        return
    if not (inspect.isclass(returns) and issubclass(returns, nn.Module)):
        raise UnsupportedModelError(
            f"user model {path!r} is annotated to return {getattr(returns, '__name__', returns)}, "
            "not a torch.nn.Module"
        )


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a model by zoo name or ``package.module:factory``.

    Args:
        name: a name from :func:`list_models`, or an importable factory ``package.module:factory``.
        **kwargs: passed to the factory (zoo models take ``num_classes`` and ``in_channels``).

    Raises:
        UnsupportedModelError: the name is unknown, the factory cannot be imported, does not accept
            the keyword arguments, or does not return an ``nn.Module``.
    """
    if ":" in name:
        factory = _import_factory(name)
    elif name in _REGISTRY:
        factory = _REGISTRY[name]
    else:
        raise UnsupportedModelError(
            f"unknown model {name!r}; valid names: {', '.join(list_models())}, "
            "or a user model as package.module:factory"
        )
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
        unknown = [k for k in kwargs if k not in signature.parameters and not accepts_any]
        if unknown:
            raise UnsupportedModelError(
                f"model {name!r} does not take {', '.join(unknown)}; "
                f"it takes: {', '.join(signature.parameters) or 'no arguments'}"
            )
        required = [
            p.name
            for p in signature.parameters.values()
            if p.default is p.empty
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            and p.name not in kwargs
        ]
        if required:
            raise UnsupportedModelError(
                f"model {name!r} needs {', '.join(required)}, which prunetune does not pass; "
                "give those parameters defaults"
            )
    elif ":" in name:
        raise UnsupportedModelError(f"user model {name!r} has no inspectable signature")
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"model factory {name!r} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def dataset_kwargs(name: str, num_classes: int, in_channels: int) -> dict[str, Any]:
    """The ``num_classes``/``in_channels`` keyword arguments that model ``name`` accepts.

    Zoo models take both; a user factory gets those its signature names, and one that takes
    ``**kwargs`` (torchvision's and timm's builders) gets ``num_classes`` alone, the keyword
    those libraries share (torchvision's ``ResNet`` rejects ``in_channels``).
    """
    factory = _import_factory(name) if ":" in name else _REGISTRY.get(name)
    if factory is None:
        create_model(name)  # raises the unknown-name error with the valid names
    wanted = {"num_classes": num_classes, "in_channels": in_channels}
    try:
        parameters = inspect.signature(factory).parameters  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return wanted
    named = {k: v for k, v in wanted.items() if k in parameters}
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        named.setdefault("num_classes", num_classes)
    return named
