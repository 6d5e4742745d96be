"""The private PyTorch APIs the `chronicals` package uses, reached from one place: the attention
kernels (`torch.ops.aten._*attention*`), a tensor's version counter, Dynamo's
dynamic-dimension mark, Inductor's default cache folder and Dynamo's compile packages. (The backend's own
private APIs are in `compile_passes/_torch_api.py`; `chronicals` does not import `compile_passes`.)

Their schemas are the same on torch 2.11 and 2.13; a torch upgrade that changes them touches this
file only. Dropout is always 0 here, so the random-state arguments are passed as None.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import sys
from collections.abc import Iterator

import torch
from torch import Tensor

aten = torch.ops.aten


def cudnn_attention_forward(q: Tensor, k: Tensor, v: Tensor, scale: float
                            ) -> tuple[Tensor, Tensor]:
    """cuDNN's causal attention, q (B, Hq, S, D), k/v (B, Hk, S, D). Returns the output (laid out
    as q is) and the fp32 log-sum-exp (B, Hq, S, 1)."""
    out = aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, True, False, scale=scale
    )
    return out[0], out[1]


def cudnn_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                             lse: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    s = q.shape[2]
    return aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse, None, None, None, None, None, s, s, 0.0, True, scale=scale
    )


def _window(window: int) -> tuple[int, int]:
    # transformers' sliding_window w lets a token see itself and the w - 1 tokens before it.
    return (-1, -1) if window == 0 else (window - 1, 0)


def flash_attention_forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                            scale: float | None, window: int) -> tuple[Tensor, Tensor]:
    """Causal flash attention over variable-length segments (PyTorch's own flash kernel, CUDA).
    q: (T, Hq, D), k/v: (T, Hk, D), cu_seqlens: int32 (segments + 1,) boundaries shared by q and
    k; window 0 for none. Returns the output (T, Hq, D) and the fp32 log-sum-exp (Hq, T)."""
    left, right = _window(window)
    out = aten._flash_attention_forward(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, True, False,
        scale=scale, window_size_left=left, window_size_right=right,
    )
    return out[0], out[1]


def flash_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                             lse: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float,
                             window: int) -> tuple[Tensor, Tensor, Tensor]:
    left, right = _window(window)
    empty = q.new_empty(0, dtype=torch.int64)
    return aten._flash_attention_backward(
        dout, q, k, v, out, lse, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, True,
        empty, empty, scale=scale, window_size_left=left, window_size_right=right,
    )


def flash_attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                           scale: float | None, sliding_window: int | None) -> Tensor:
    """Differentiable flash attention over segments (autograd through aten's own derivative of
    `_flash_attention_forward`), for transformers' AttentionInterface path
    (chronicals/attention.py)."""
    return flash_attention_forward(q, k, v, cu_seqlens, max_seqlen, scale, sliding_window or 0)[0]


def inductor_default_cache_dir() -> str:
    """The folder Inductor uses when `TORCHINDUCTOR_CACHE_DIR` is unset. Importing Dynamo writes
    it into that variable (for its own cache), so a value equal to it is torch's, not the user's."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return default_cache_dir()


def version(tensor: Tensor) -> int:
    """`tensor`'s version counter: it grows with every in-place change of its data."""
    return tensor._version


def mark_dynamic(tensor: Tensor, dim: int) -> None:
    """Compile `tensor`'s dimension `dim` as dynamic from the first graph on (no recompile when
    its length changes), unless Dynamo finds it must be static."""
    torch._dynamo.maybe_mark_dynamic(tensor, dim)


def is_graph_break_in_region(error: BaseException) -> bool:
    """Whether `error` is Dynamo refusing a nested compile region (chronicals/regions.py) whose
    code breaks the graph: such a region must be captured whole, and Dynamo raises instead of
    splitting it."""
    return isinstance(error, torch._dynamo.exc.UncapturedHigherOrderOpError)


def is_backend_failure(error: BaseException) -> bool:
    """Whether `error` is torch.compile's backend failing to compile a graph Dynamo traced."""
    return isinstance(error, torch._dynamo.exc.BackendCompilerFailed)


@contextlib.contextmanager
def compile_packages() -> Iterator[None]:
    """Dynamo's compile packages on, inside the block (`torch._dynamo.config.caching_precompile`):
    a function compiled there is looked up in the package folder
    (`$TORCHINDUCTOR_CACHE_DIR/dynamo`) when `torch.compile` wraps it, and a package found runs
    its saved graphs, guards checked, with neither Dynamo's tracing nor the backend. Dynamo keeps
    no guard on object identities in this mode (ids differ between processes), in its package
    and in memory; it logs a warning for each guard it leaves out (a few hundred for a decoder),
    which this block keeps out of the log."""
    guards_log = logging.getLogger("torch._dynamo.guards")
    guards_log.addFilter(_not_a_dropped_guard)
    try:
        with torch._dynamo.config.patch(caching_precompile=True):
            yield
    finally:
        guards_log.removeFilter(_not_a_dropped_guard)


def _not_a_dropped_guard(record: logging.LogRecord) -> bool:
    return "is dropped with caching_precompile=True" not in record.getMessage()


_NUMBERED_NAME = re.compile(r"__\w+?_(\d+)")


def number_names_past_loaded_packages() -> None:
    """Make Dynamo number the globals it installs past those a loaded package installed.

    Dynamo names a compiled graph's globals (`__builtins_dict___0`, `__compiled_fn_1`, ...) from
    one counter per process, and a package carries the names its saving process drew. Loading it
    writes some of them into the modules' globals for good, so a later compile in this process
    (a new input shape, the evaluation's graph) could draw a name already there, which Dynamo
    refuses (an AssertionError). Called after a package is loaded: the counter moves past every
    such name in the loaded modules."""
    from torch._dynamo import bytecode_transformation

    highest = -1
    for module in list(sys.modules.values()):
        for name in list(getattr(module, "__dict__", {})):
            if name.startswith("__") and (numbered := _NUMBERED_NAME.fullmatch(name)):
                highest = max(highest, int(numbered.group(1)))
    following = next(bytecode_transformation._unique_id_counter)
    bytecode_transformation._unique_id_counter = itertools.count(max(following, highest + 1))


def save_compile_packages() -> None:
    """Write the packages of the functions compiled with `compile_packages` on, with the graphs
    compiled so far, into the package folder (replacing what was there for the same function)."""
    from torch._dynamo.precompile_context import PrecompileContext

    PrecompileContext.save_to_dynamo_cache()


def compile_packages_loaded() -> int:
    """Compile packages this process has loaded from the package folder."""
    from torch._dynamo.utils import counters

    return int(counters["dynamo_cache"]["dynamo_cache_hit"])


def graphs_compiled() -> int:
    """Graphs Dynamo has compiled in this process (not counting those a package brought)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
