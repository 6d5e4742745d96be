"""Chronicals: fused kernels and a torch.compile backend for fine-tuning decoder LLMs.

    torch.compile(model, backend="chronicals")

The functional core lives here (`chronicals.ops`, packing, LoRA+, the training step); the
backend's graph passes live in the `compile_passes` package.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from chronicals.attention import PACKED_ATTENTION, register_packed_attention, use_packed_attention
from chronicals.lora_plus import lora_plus_param_groups
from chronicals.packing import PackedBatch, PackingCollator, PackingStats, pack
from chronicals.train import StepMetrics, compile_loss, evaluate_loss, train_step

__version__ = "0.1.0"

__all__ = [
    "PACKED_ATTENTION",
    "PackedBatch",
    "PackingCollator",
    "PackingStats",
    "StepMetrics",
    "compile_loss",
    "compile_model",
    "evaluate_loss",
    "lora_plus_param_groups",
    "pack",
    "register_packed_attention",
    "train_step",
    "use_packed_attention",
]


def __getattr__(name: str):
    # compile_model imports transformers, which `import chronicals` does not need otherwise.
    if name == "compile_model":
        from chronicals.hf import compile_model

        return compile_model
    raise AttributeError(f"module 'chronicals' has no attribute {name!r}")


def _register_backend_for_source_checkout() -> None:
    """An installed package registers backend="chronicals" through its `torch_dynamo_backends`
    entry point, which torch loads lazily. A source checkout on PYTHONPATH has no entry point, so
    importing chronicals registers the backend here instead."""
    if any(ep.name == "chronicals" for ep in entry_points(group="torch_dynamo_backends")):
        return
    from compile_passes.backend import register

    register()


_register_backend_for_source_checkout()
