"""The reference's `util.nethook`: forward hooks on named submodules. The implementation is
rome_fast.hooks, which takes the reference's signatures and defaults (docs/dropin.md lists the
few deliberate differences)."""
from ...hooks import (StopForward, Trace, TraceDict, get_module, get_parameter, hierarchical_subsequence,
                      invoke_with_optional_args, recursive_copy, replace_module, set_requires_grad, subsequence)

__all__ = ["StopForward", "Trace", "TraceDict", "get_module", "get_parameter", "hierarchical_subsequence",
           "invoke_with_optional_args", "recursive_copy", "replace_module", "set_requires_grad", "subsequence"]
