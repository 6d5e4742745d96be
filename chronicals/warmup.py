"""Warm-up of a job: compile caches on disk, and the time to the first fast steps.

Inductor and AOTAutograd keep what they compiled in a cache on disk (under
`TORCHINDUCTOR_CACHE_DIR`, PyTorch's own setting), so a second run of the same job can start from
it. Their keys hash the graph and PyTorch's state, and the backend adds `sources_hash()`, a hash
of its own and the ops' sources (compile_passes/_torch_api.py, `_SourcesInCacheKey`); the folder
is keyed too, by `cache_key()`: chronicals' version, that hash and the torch version. An upgrade of
chronicals then starts a new folder rather than reading entries built against other code, and
an old folder can be deleted whole.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pathlib
import time

import torch

from chronicals import _torch_private

logger = logging.getLogger(__name__)

_PACKAGES = ("chronicals", "compile_passes")
_INSTALLED = pathlib.Path(__file__).resolve().parent.parent
_CACHE_VARIABLE = "TORCHINDUCTOR_CACHE_DIR"
WARMUP_STEPS = 5
"""Steps the warm-up time covers: the compile, and the first steps after it."""


@functools.cache
def sources_hash(root: pathlib.Path = _INSTALLED) -> str:
    """sha256 (hex) of the Python sources of chronicals and its backend under `root`
    (this installation's), with their paths: any edit, added or removed file changes it."""
    digest = hashlib.sha256()
    for package in _PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode())
            digest.update(b"\0")
            digest.update(path.read_bytes())
            digest.update(b"\0")
    return digest.hexdigest()


def cache_key(version: str | None = None, sources: str | None = None) -> str:
    """The cache folder's name: `chronicals-<version>-<sources hash>-torch-<torch version>`
    (this installation's, unless given)."""
    if version is None:
        from chronicals import __version__ as version
    sources = sources_hash() if sources is None else sources
    torch_version = torch.__version__.replace("+", "_")
    return f"chronicals-{version}-{sources}-torch-{torch_version}"


def default_cache_root() -> pathlib.Path:
    """`$XDG_CACHE_HOME/chronicals/compile`, or `~/.cache/chronicals/compile`."""
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "chronicals" / "compile"


_SET_HERE: set[str] = set()
"""The values of the cache variable this module set (any other value is the user's)."""


def use_compile_cache(root: str | os.PathLike | None = None) -> pathlib.Path:
    """Point Inductor's and AOTAutograd's caches of this process at `root / cache_key()` and
    return that folder. `root` None: the folder an earlier call of this process chose, else a
    folder under the user's own `TORCHINDUCTOR_CACHE_DIR` (its `chronicals/`) where they set one,
    else under `default_cache_root()`. Call it before the first compile. (Importing Dynamo sets
    the variable to torch's default folder; that value is not taken for the user's.)"""
    current = os.environ.get(_CACHE_VARIABLE)
    if current == _torch_private.inductor_default_cache_dir():
        current = None
    if root is None and current in _SET_HERE:
        return pathlib.Path(current)  # an earlier job of this process chose it
    if root is None:
        root = pathlib.Path(current) / "chronicals" if current else default_cache_root()
    path = pathlib.Path(root) / cache_key()
    path.mkdir(parents=True, exist_ok=True)
    os.environ[_CACHE_VARIABLE] = str(path)
    _SET_HERE.add(str(path))
    return path


class WarmUpClock:
    """Seconds from its making (before the compile) to the end of step `start_step + steps`,
    measured once, after the device has finished that step's work."""

    def __init__(self, start_step: int, steps: int = WARMUP_STEPS) -> None:
        if steps < 1:
            raise ValueError(f"WarmUpClock: steps must be >= 1. Got {steps}.")
        self.start_step, self.steps = start_step, steps
        self.seconds: float | None = None
        self._start = time.perf_counter()

    def step_done(self, step: int, device: torch.device, last_step: int) -> float | None:
        """After step `step`: the warm-up time, the first time `steps` steps (or the run's
        `last_step`) are done; else None."""
        if self.seconds is not None or step < min(self.start_step + self.steps, last_step):
            return None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds = time.perf_counter() - self._start
        return self.seconds
