"""The `chronicals` torch.compile backend: FX pattern passes that rewrite Hugging Face decoder
subgraphs (RMSNorm, SwiGLU/GeGLU, QK-RoPE, LM head + cross-entropy) into Chronicals ops.

    torch.compile(model, backend="chronicals", options={"strict": True})
"""

from compile_passes.backend import BackendOptions, chronicals_backend, register
from compile_passes.report import (
    FusionReport,
    GraphBreak,
    Rejection,
    clear_fusion_reports,
    fusion_reports,
)

__all__ = [
    "BackendOptions",
    "FusionReport",
    "GraphBreak",
    "Rejection",
    "chronicals_backend",
    "clear_fusion_reports",
    "fusion_reports",
    "register",
]
