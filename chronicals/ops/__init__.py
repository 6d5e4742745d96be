"""Fused ops, each a `torch.library` custom op in the `chronicals` namespace.

Importing this package registers `torch.ops.chronicals.*`.
"""

from chronicals.ops._launch import implementation

__all__ = ["implementation"]
