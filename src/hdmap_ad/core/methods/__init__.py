"""Training methods as plug-ins: one model, one loop, a method changes loss / map aggregation / extra head
/ a training-only dropout, and methods combine (`topk+hseg`).

To add a method `foo`, every step below is needed (tests/test_architecture.py fails when one of 1-5 is
missing or disagrees with METHODS; tests/test_methods.py when 6 is):
1. hdmap_ad/core/method_params.py: its settings schema `FooParams` and its entry in `METHODS` (schema,
   the hooks it changes, a one-line summary, compare's label), at the place in the list where it
   should be shown: grid's default methods, compare's rows and params validation read it from there;
2. hdmap_ad/core/methods/foo.py: a `Method` subclass with `name = "foo"`, decorated by `@register`,
   overriding exactly the hooks its entry lists (loss -> `loss`, map -> `reduce_maps`, bottleneck_input
   / decoder_values -> `attach` + `begin_step`);
3. this file: import the module below so it registers;
4. params.yaml: a `foo:` section with the schema's defaults (one per entry of `METHODS`);
5. docs/design.md §5: a subsection with its definition, anchored `<a id="m-foo">`; README's methods
   table: a row `| `foo` | what changes | `foo: {its settings}` |`;
6. tests/test_methods.py: the name in test_registry_lists_every_method, and tests of what it changes.
"""

# isort: off
# Imports register the methods, in the order of hdmap_ad.core.method_params.METHODS.
from hdmap_ad.core.methods.base import (
    REGISTRY,
    Combination,
    Method,
    MethodContext,
    NoParams,
    build,
    build_method,
    register,
)
from hdmap_ad.core.methods import baseline  # noqa: F401
from hdmap_ad.core.methods import gem, focal, aux, scale, topk, hseg, vdrop  # noqa: F401
# isort: on

__all__ = ["REGISTRY", "Combination", "Method", "MethodContext", "NoParams", "build", "build_method", "register"]
