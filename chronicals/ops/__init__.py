"""Fused ops, each a `torch.library` custom op in the `chronicals` namespace.

Importing this package registers `torch.ops.chronicals.*`.
"""

from chronicals.ops import attention, linear_cross_entropy, rms_norm, rope, swiglu
from chronicals.ops._launch import implementation

__all__ = ["attention", "implementation", "linear_cross_entropy", "rms_norm", "rope", "swiglu"]
