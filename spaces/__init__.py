"""Search spaces: each a relaxation of the pruned-architecture choice with its inner optimisation.

``create_space(name, **options)`` builds one by name (see :func:`list_spaces`).
"""

# importing the implementations registers them
from prunetune.spaces import _dais, _ddpnas, _dsa, _ratios  # noqa: F401
from prunetune.spaces._base import (
    Report,
    Space,
    SpaceContext,
    SpaceResult,
    create_space,
    finalize,
    list_spaces,
    register_space,
)

__all__ = [
    "Report",
    "Space",
    "SpaceContext",
    "SpaceResult",
    "create_space",
    "finalize",
    "list_spaces",
    "register_space",
]
