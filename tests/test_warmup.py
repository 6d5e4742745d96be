"""Compile caches keyed by chronicals' version and sources; the warm-up clock."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

import chronicals
from chronicals.warmup import WarmUpClock, cache_key, sources_hash, use_compile_cache

_ROOT = Path(chronicals.__file__).resolve().parent.parent


def test_cache_key_changes_with_the_version_and_the_sources():
    key = cache_key()
    assert key.startswith(f"chronicals-{chronicals.__version__}-{sources_hash()}-torch-")
    assert cache_key(version="9.9.9") != key
    assert cache_key(sources="0" * 16) != key
    assert cache_key(version=chronicals.__version__, sources=sources_hash()) == key


def test_sources_hash_changes_with_any_source_file(tmp_path):
    for package in ("chronicals", "compile_passes"):
        shutil.copytree(_ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__", "data"))
    copied = sources_hash(tmp_path)
    assert copied == sources_hash(_ROOT)  # the same sources, another place
    edited = tmp_path / "compile_passes" / "rms_norm.py"
    edited.write_text(edited.read_text() + "\n# an edit\n")
    sources_hash.cache_clear()  # computed once per process, and root, otherwise
    after_edit = sources_hash(tmp_path)
    assert after_edit != copied
    (tmp_path / "chronicals" / "new_module.py").write_text("")
    sources_hash.cache_clear()
    assert sources_hash(tmp_path) not in (copied, after_edit)


def test_use_compile_cache_points_inductor_at_the_keyed_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    path = use_compile_cache(tmp_path)
    assert path == tmp_path / cache_key() and path.is_dir()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(path)
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == str(path)  # where Inductor and AOTAutograd write their entries


def test_a_users_own_inductor_cache_folder_is_kept_as_the_root(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    path = use_compile_cache()
    assert path == tmp_path / "mine" / "chronicals" / cache_key()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(path)
    assert use_compile_cache() == path  # a second job in the process: the same folder


def test_torchs_own_default_folder_is_not_taken_for_the_users(tmp_path, monkeypatch):
    # Importing Dynamo writes Inductor's default folder into the variable; the job's cache still
    # goes under default_cache_root() (~/.cache/chronicals/compile), not under /tmp.
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = use_compile_cache()
    assert path == tmp_path / "xdg" / "chronicals" / "compile" / cache_key()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(path)


def test_warm_up_clock_reads_once_after_its_steps():
    clock = WarmUpClock(start_step=10, steps=3)
    cpu = torch.device("cpu")
    assert clock.step_done(11, cpu, last_step=100) is None
    assert clock.step_done(12, cpu, last_step=100) is None
    seconds = clock.step_done(13, cpu, last_step=100)
    assert seconds is not None and seconds >= 0
    assert clock.step_done(14, cpu, last_step=100) is None and clock.seconds == seconds
    short = WarmUpClock(start_step=0, steps=5)
    assert short.step_done(2, cpu, last_step=2) is not None  # a run shorter than the warm-up
    with pytest.raises(ValueError, match="steps must be >= 1. Got 0"):
        WarmUpClock(0, steps=0)
