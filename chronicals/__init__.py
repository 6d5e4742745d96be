"""Chronicals: fused kernels and a torch.compile backend for fine-tuning decoder LLMs.

    torch.compile(model, backend="chronicals")

The functional core lives here (`chronicals.ops`, packing, LoRA+, the training step); the
backend's graph passes live in the `compile_passes` package.
"""

from __future__ import annotations

from importlib.metadata import entry_points

__version__ = "0.1.0"


def _register_backend_for_source_checkout() -> None:
    """An installed package registers backend="chronicals" through its `torch_dynamo_backends`
    entry point, which torch loads lazily. A source checkout on PYTHONPATH has no entry point, so
    importing chronicals registers the backend here instead."""
    if any(ep.name == "chronicals" for ep in entry_points(group="torch_dynamo_backends")):
        return
    from compile_passes.backend import register

    register()


_register_backend_for_source_checkout()
