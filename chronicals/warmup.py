"""Warm-up of a job: compile caches on disk, and the time to the first fast steps.

Inductor and AOTAutograd keep what they compiled in a cache on disk (under
`TORCHINDUCTOR_CACHE_DIR`, PyTorch's own setting), so a second run of the same job can start from
it. Their keys hash the graph and PyTorch's state, and the backend adds `sources_hash()`, a hash
of its own and the ops' sources (compile_passes/_torch_api.py, `_SourcesInCacheKey`); the folder
is keyed too, by `cache_key()`: chronicals' version, that hash and the torch version. An upgrade of
chronicals then starts a new folder rather than reading entries built against other code, and
an old folder can be deleted whole.

Those caches still leave Dynamo's tracing, the backend's rewrite and AOTAutograd's lookups to
every start. `CompilePackages` keeps Dynamo's own output too, where Inductor compiles: a package
of the traced code, its guards and the compiled graphs, which a later run loads and runs without
tracing or compiling anything. A package keeps no guard on object identities, so its folder is
keyed by what such guards would see (`compile_fingerprint`: the model's class and config, its
adapters, the backend and its options, the libraries' versions, the device).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import pathlib
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from chronicals import _torch_private
from chronicals.regions import wraps_kernel_tables

logger = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

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


def compile_fingerprint(model: nn.Module, backend: str,
                        options: Mapping[str, Any] | None = None,
                        device: torch.device | None = None) -> str:
    """sha256 (hex) of what decides a job's compiled graphs besides the inputs' shapes: the
    model's class, config and adapters (PEFT's configs), whether its layers are checkpointed, the
    backend and its options (callables left out), the versions of transformers, peft and triton,
    and the GPU's name. Dynamo's guards check most of it while a process runs, partly by object
    identity, which a compile package cannot keep."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    adapters = getattr(model, "peft_config", {})
    described = {
        "model": f"{type(model).__module__}.{type(model).__qualname__}",
        "base": f"{type(base).__module__}.{type(base).__qualname__}",
        "config": None if config is None else _without_paths(config.to_dict()),
        "adapters": {name: _without_paths(adapter.to_dict())
                     for name, adapter in sorted(adapters.items())},
        "checkpointed": _checkpointed(base),
        "backend": backend,
        "options": {k: v for k, v in sorted((options or {}).items()) if not callable(v)},
        "versions": {name: _version(name) for name in ("transformers", "peft", "triton")},
        "device": (torch.cuda.get_device_name(device)
                   if device is not None and device.type == "cuda" else None),
    }
    text = json.dumps(described, sort_keys=True, default=_jsonable)
    return hashlib.sha256(text.encode()).hexdigest()


def _without_paths(settings: dict[str, Any]) -> dict[str, Any]:
    # Where the weights were read from (`_name_or_path`, PEFT's `base_model_name_or_path`)
    # decides nothing compiled: a copy of the model elsewhere compiles to the same graphs.
    return {k: v for k, v in settings.items() if not k.endswith("name_or_path")}


def _jsonable(value: object) -> object:
    # A set (PEFT's target_modules) in a stable order: its own differs between processes.
    if isinstance(value, (set, frozenset)):
        return sorted(map(str, value))
    return str(value)


def _checkpointed(model: nn.Module) -> bool:
    # transformers 5.25 renamed the property (the old name warns); 5.17 has the old one only.
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


_SET_HERE: dict[str, pathlib.Path] = {}
"""The values of the cache variable this module set (any other value is the user's) -> the root
they were made under."""


def use_compile_cache(root: str | os.PathLike | None = None,
                      job: str | None = None) -> pathlib.Path:
    """Point Inductor's and AOTAutograd's caches (and Dynamo's packages) of this process at
    `root / cache_key()`, or at its subfolder `job-<job[:16]>` for a job's fingerprint
    (`compile_fingerprint`), and return that folder. `root` None: the root an earlier call of
    this process chose, else a folder under the user's own `TORCHINDUCTOR_CACHE_DIR` (its
    `chronicals/`) where they set one, else `default_cache_root()`. Call it before the first
    compile. (Importing Dynamo sets the variable to torch's default folder; that value is not
    taken for the user's.)"""
    current = os.environ.get(_CACHE_VARIABLE)
    if current == _torch_private.inductor_default_cache_dir():
        current = None
    if root is None and current in _SET_HERE:
        root = _SET_HERE[current]  # an earlier job of this process chose it
    if root is None:
        root = pathlib.Path(current) / "chronicals" if current else default_cache_root()
    path = pathlib.Path(root) / cache_key()
    if job is not None:
        path = path / f"job-{job[:16]}"
    path.mkdir(parents=True, exist_ok=True)
    os.environ[_CACHE_VARIABLE] = str(path)
    _SET_HERE[str(path)] = pathlib.Path(root)
    return path


class CompilePackages:
    """Dynamo's compile packages for one job, in its compile cache folder: on inside the `with`
    block (compile the job's function there, with `compile`), saved after the warm-up and after
    any later step that compiled a graph (`save_new_graphs`), loaded by a later run's compile.

    Packages are experimental in torch. They stay off for a model whose modules the optional
    `kernels` package wraps (torch 2.13 saves its package but fails to load it: it rebuilds the
    guards on a copy of the model without the forward a layer region sets, and a guard on that
    forward's closure fails, after part of the package is installed). Where Dynamo fails with them
    on otherwise and works without, the run warns, compiles again without them and goes on; the
    folder records why (`packages-off.txt`), and its later runs start from Inductor's and
    AOTAutograd's caches alone.

    A package holds the compiled graphs, not the backend's report of them: `remember_report`
    keeps each report's record in the folder (`fusion-reports.json`), and `loaded_reports` gives
    them back to a run that loaded the package."""

    REPORTS = "fusion-reports.json"
    OFF = "packages-off.txt"

    def __init__(self, folder: pathlib.Path | None, model: nn.Module | None = None) -> None:
        self.folder = folder
        self.off_reason: str | None = None
        """Why packages are off for this folder or model, if they are."""
        if folder is not None and (folder / self.OFF).is_file():
            self.off_reason = (folder / self.OFF).read_text().strip()
        elif folder is not None and model is not None and wraps_kernel_tables(model):
            self.off_reason = ("the model's modules carry the `kernels` package's wrappers, "
                               "whose packages torch fails to load")
        self._stack: contextlib.ExitStack | None = None
        self._saved_at = 0
        self._loaded_before: int | None = None

    @property
    def enabled(self) -> bool:
        """Packages on: a folder whose packages are not off, inside the block."""
        return self._stack is not None

    def __enter__(self) -> None:
        if self.folder is not None and self.off_reason is None:
            self._stack = contextlib.ExitStack()
            self._stack.enter_context(_torch_private.compile_packages())
            self._loaded_before = _torch_private.compile_packages_loaded()
            self._saved_at = _torch_private.graphs_compiled()

    def __exit__(self, *exc: object) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def compile(self, make: Callable[[], F]) -> F:
        """`make()` (a `torch.compile` call, which loads the package), as a function that turns
        packages off where they fail: where `make()` or a call of what it made raises with
        packages on and works without them, the package is the cause."""
        if not self.enabled:
            return make()
        try:
            compiled = make()
        except Exception as error:  # noqa: BLE001 (whether packages caused it is tried below)
            compiled, _ = self._without_packages(make, error)
        if self.loaded:
            _torch_private.number_names_past_loaded_packages()

        def call(*args: Any, **kwargs: Any) -> Any:
            nonlocal compiled
            if not self.enabled:
                return compiled(*args, **kwargs)
            try:
                return compiled(*args, **kwargs)
            except torch.OutOfMemoryError:
                raise
            except Exception as error:  # noqa: BLE001 (as above)
                compiled, result = self._without_packages(make, error, (args, kwargs))
                return result

        return call  # type: ignore[return-value]

    def _without_packages(self, make: Callable[[], F], error: Exception,
                          call: tuple[tuple, dict] | None = None) -> tuple[F, Any]:
        """Packages off, `make()` again, and the call that failed made again (if one did); if
        these work, warn and record it in the folder. Their error, if they fail."""
        self.__exit__()
        self._loaded_before = None
        compiled = make()
        result = None if call is None else compiled(*call[0], **call[1])
        why = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
        self.off_reason = f"Dynamo failed with this folder's compile package on ({why})"
        _write_atomically(self.folder / self.OFF, self.off_reason + "\n")
        shutil.rmtree(self.folder / "dynamo", ignore_errors=True)
        warnings.warn(f"chronicals: {self.off_reason}; compiled again without it, and this "
                      f"folder's runs start from the Inductor and AOTAutograd caches only "
                      f"(delete {self.folder / self.OFF} to try packages again).",
                      stacklevel=3)
        return compiled, result

    def compile_options(self) -> dict[str, Any]:
        """Options for `torch.compile` with packages on: a guard filter that leaves out the
        guards a package cannot hold (`_savable_guards`)."""
        return {"guard_filter_fn": _savable_guards} if self.enabled else {}

    @property
    def loaded(self) -> bool:
        """Whether a package was loaded since the block began."""
        return (self._loaded_before is not None
                and _torch_private.compile_packages_loaded() > self._loaded_before)

    def save_new_graphs(self) -> bool:
        """Save the packages if Dynamo compiled a graph since the last save; whether it did."""
        if not self.enabled or _torch_private.graphs_compiled() == self._saved_at:
            return False
        _torch_private.save_compile_packages()
        self._saved_at = _torch_private.graphs_compiled()
        return True

    def remember_report(self, record: Mapping[str, Any]) -> None:
        """Keep a compiled graph's report record (JSON-able) for runs that load its package."""
        if not self.enabled:
            return
        records = self.loaded_reports()
        if record not in records:
            _write_atomically(self.folder / self.REPORTS, json.dumps([*records, record]))

    def loaded_reports(self) -> list[dict[str, Any]]:
        """The report records kept in the folder ([] if none, or unreadable)."""
        if self.folder is None:
            return []
        try:
            records = json.loads((self.folder / self.REPORTS).read_text())
        except (OSError, ValueError):
            return []
        return records if isinstance(records, list) else []


# Guards on the identity of a class, function, module or object: a package cannot hold them (the
# ids differ in the next process). torch's own `aot_compile` leaves the same kinds out.
_IDENTITY_GUARDS = frozenset({"ID_MATCH", "CLASS_MATCH", "FUNCTION_MATCH", "MODULE_MATCH",
                              "CLOSURE_MATCH", "NN_MODULE", "DICT_VERSION", "WEAKREF_ALIVE"})


def _savable_guards(entries: Sequence[Any]) -> list[bool]:
    """Which guards a package keeps: all but identity guards and type guards on classes defined
    inside a function or another class (which a package cannot name). torch 2.11 fails a compile
    that meets either while packages are on; the folder's key covers what they check."""
    return [entry.guard_type not in _IDENTITY_GUARDS
            and not set(entry.derived_guard_types) & _IDENTITY_GUARDS
            and not (entry.guard_type in ("TYPE_MATCH", "BUILTIN_MATCH") and entry.has_value
                     and type(entry.value).__qualname__ != type(entry.value).__name__)
            for entry in entries]


def _write_atomically(path: pathlib.Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(text)
    os.replace(partial, path)


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
