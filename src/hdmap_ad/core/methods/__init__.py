"""Training methods as plug-ins: one model, one loop, a method changes loss / map aggregation / extra head.

To add a method: write one module with a `Method` subclass decorated by `@register`, and import it
below so it registers.
"""

# isort: off
# Imports register the methods, in the order of docs/design.md#5-methods (error messages list them so).
from hdmap_ad.core.methods.base import REGISTRY, Method, MethodContext, NoParams, build, register
from hdmap_ad.core.methods import baseline  # noqa: F401
from hdmap_ad.core.methods import gem, focal, aux, scale, topk  # noqa: F401
# isort: on

__all__ = ["REGISTRY", "Method", "MethodContext", "NoParams", "build", "register"]
