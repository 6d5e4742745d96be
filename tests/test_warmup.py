"""Compile caches keyed by chronicals' version and sources, and by the job; Dynamo's compile
packages; the warm-up clock."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import peft
import pytest
import torch

import chronicals
from chronicals.warmup import (
    CompilePackages,
    WarmUpClock,
    _savable_guards,
    cache_key,
    compile_fingerprint,
    sources_hash,
    use_compile_cache,
)
from tests.helpers import packages_on_for_tiny_models
from tests.models import tiny_model

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


def test_a_jobs_folder_is_keyed_by_its_fingerprint_under_the_versions_folder(tmp_path,
                                                                           monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    first = use_compile_cache(tmp_path, job="ab" * 32)
    assert first == tmp_path / cache_key() / ("job-" + "ab" * 8) and first.is_dir()
    # A second job of the process, another model: a folder of its own under the same root.
    assert use_compile_cache(job="cd" * 32) == tmp_path / cache_key() / ("job-" + "cd" * 8)


def _lora(model, r=4, targets=("q_proj", "v_proj")):
    return peft.get_peft_model(model, peft.LoraConfig(r=r, target_modules=list(targets)))


def test_fingerprint_follows_what_decides_the_compiled_graphs():
    def fingerprint(model, backend="chronicals", **options):
        return compile_fingerprint(model, backend, {"lora_precision": "mixed", **options})

    llama = fingerprint(tiny_model("llama"))
    # Not the weights, nor where they were read from, nor a callable option (the report).
    other = tiny_model("llama", seed=5)
    other.config._name_or_path = "/somewhere/else"
    assert fingerprint(other, report=print) == llama
    # The backend and its options, the model's class and config.
    assert fingerprint(tiny_model("llama"), lora_precision="exact") != llama
    assert fingerprint(tiny_model("llama"), backend="inductor") != llama
    assert fingerprint(tiny_model("mistral")) != llama
    assert fingerprint(tiny_model("llama", rms_norm_eps=1e-5)) != llama
    checkpointed = tiny_model("llama")
    checkpointed.gradient_checkpointing_enable()
    assert fingerprint(checkpointed) != llama
    # The adapters: their settings count, the order their targets were listed in does not.
    adapted = fingerprint(_lora(tiny_model("llama")))
    assert adapted != llama
    assert fingerprint(_lora(tiny_model("llama"), targets=("v_proj", "q_proj"))) == adapted
    assert fingerprint(_lora(tiny_model("llama"), r=8)) != adapted


def test_package_keeps_all_guards_but_identities_and_unnamed_classes():
    class Local:  # defined in a function: a package cannot name it
        pass

    def entry(guard_type, value=None, derived=()):
        return SimpleNamespace(guard_type=guard_type, derived_guard_types=derived,
                               has_value=value is not None, value=value)

    kept = _savable_guards([
        entry("TENSOR_MATCH", torch.zeros(1)), entry("TYPE_MATCH", torch.nn.Linear(1, 1)),
        entry("CONSTANT_MATCH", 3), entry("ID_MATCH"), entry("CLASS_MATCH"),
        entry("TYPE_MATCH", Local()), entry("EQUALS_MATCH", 2, derived=("ID_MATCH",)),
    ])
    assert kept == [True, True, True, False, False, False, False]


def test_reports_kept_with_a_package_come_back_once_each(tmp_path):
    packages = CompilePackages(tmp_path)
    record = {"kind": "compile", "fired": {"rms_norm": 3}, "summary": "3 rms_norm"}
    with packages:
        packages.remember_report(record)
        packages.remember_report(dict(record))  # the same graph compiled again
        packages.remember_report({**record, "summary": "eval"})
    assert CompilePackages(tmp_path).loaded_reports() == [record, {**record, "summary": "eval"}]
    (tmp_path / CompilePackages.REPORTS).write_text("{damaged")
    assert CompilePackages(tmp_path).loaded_reports() == []
    assert CompilePackages(None).loaded_reports() == []


class _Flaky:
    """A stand-in for `torch.compile`'s product that fails while packages are on."""

    def __init__(self, packages: CompilePackages, fails_always: bool = False) -> None:
        self.packages, self.fails_always, self.made = packages, fails_always, 0

    def make(self):
        self.made += 1
        on = self.packages.enabled

        def run(x):
            if on or self.fails_always:
                raise IndexError("tuple index out of range")
            return x + 1

        return run


def test_a_package_that_fails_turns_packages_off_for_the_folder(tmp_path):
    (tmp_path / "dynamo").mkdir()
    packages = CompilePackages(tmp_path)
    flaky = _Flaky(packages)
    with packages:
        assert packages.enabled
        fn = packages.compile(flaky.make)
        with pytest.warns(UserWarning, match="IndexError: tuple index out of range"):
            assert fn(1) == 2  # made again without packages, the failed call made again
        assert not packages.enabled and flaky.made == 2
        assert fn(2) == 3
    assert "IndexError" in (tmp_path / CompilePackages.OFF).read_text()
    assert not (tmp_path / "dynamo").exists()
    later = CompilePackages(tmp_path)
    with later:
        assert not later.enabled and "IndexError" in later.off_reason


def test_a_failure_packages_do_not_cause_is_raised_and_recorded_nowhere(tmp_path):
    packages = CompilePackages(tmp_path)
    with packages:
        fn = packages.compile(_Flaky(packages, fails_always=True).make)
        with pytest.raises(IndexError):
            fn(1)
    assert not (tmp_path / CompilePackages.OFF).exists()


_PACKAGED_RUN = textwrap.dedent("""
    import json, sys
    import torch
    from chronicals.train import compile_loss
    from chronicals.warmup import CompilePackages, use_compile_cache, compile_fingerprint
    from compile_passes._torch_api import unique_graphs_compiled
    from tests.models import tiny_batch, tiny_model

    model = tiny_model("llama")
    reports = []
    options = {"compiler": "inductor", "report": reports.append}
    packages = CompilePackages(
        use_compile_cache(sys.argv[1], job=compile_fingerprint(model, "chronicals", options)),
        model)
    ids, labels = tiny_batch()
    batch = {"input_ids": ids, "labels": labels}
    with packages:
        loss_fn = packages.compile(lambda: compile_loss(
            model, options={**options, **packages.compile_options()}))
        loss = loss_fn(batch, torch.tensor(20))
        loss.backward()
        grads = [p.grad.double().norm().item() for p in model.parameters()]
        for report in reports:
            packages.remember_report({"fired": report.fired})
        packages.save_new_graphs()
        cpu = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=cpu) as profile:  # a step, compile done
            loss_fn(batch, torch.tensor(20)).backward()
    ops = sorted(e.name for e in profile.events() if e.name.startswith("chronicals::"))
    print(json.dumps({
        "off": packages.off_reason, "loaded": packages.loaded, "graphs": unique_graphs_compiled(), "reports": len(reports),
        "kept": packages.loaded_reports(), "ops": ops, "loss": loss.item(), "grads": grads,
    }))
""")


def test_a_package_runs_the_rewritten_graphs_in_a_new_process_without_compiling(tmp_path):
    # Inductor on the CPU (the backend's default there, aot_eager, makes no package), the ops'
    # PyTorch references (the interpreter is not the point).
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(_ROOT)}

    def run() -> dict:
        done = subprocess.run([sys.executable, "-c", _PACKAGED_RUN, str(tmp_path)], env=env,
                              cwd=_ROOT, capture_output=True, text=True, timeout=900, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first, second = run(), run()
    assert not first["loaded"] and first["graphs"] == 1 and first["reports"] == 1
    if not packages_on_for_tiny_models():  # packages off: each process compiles
        assert first["off"] and not second["loaded"] and second["graphs"] == 1
        assert second["loss"] == first["loss"]
        return
    assert first["off"] is None
    fired = first["kept"][0]["fired"]
    assert fired["rms_norm"] == 3 and fired["swiglu"] == 2 and fired["rope"] == 2
    assert fired["linear_cross_entropy"] == 1
    # The second process loads the package: no graph traced, the backend not called, and the
    # fused ops run as in the first, with the same loss and gradients.
    assert second["loaded"] and second["graphs"] == 0 and second["reports"] == 0
    assert second["kept"] == first["kept"]
    assert second["ops"] == first["ops"] and any("rms_norm" in op for op in first["ops"])
    assert second["loss"] == first["loss"] and second["grads"] == first["grads"]
    assert all(g > 0 for g in first["grads"])
