"""The README says what CI does: its supported-versions table matches pyproject.toml's bounds and
the two stacks .ci/run installs, and its two commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
CI = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
NEWEST = "newest in range"


def _versions_table() -> dict[str, list[str]]:
    """The rows of the table under '## Supported versions': package -> its other cells."""
    section = README.split("\n## Supported versions\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header, rule, *rows = lines
    assert set(rule) <= set("|-") and len(header.split("|")) == 6, header
    table = {}
    for row in rows:
        package, *cells = [c.strip() for c in row.strip("|").split("|")]
        table[package] = cells
    return table


def _code(cell: str) -> str:
    """The text between backticks in a cell."""
    match = re.fullmatch(r"`([^`]+)`", cell)
    assert match, f"expected a `version` cell, got {cell!r}"
    return match.group(1)


def _pyproject_bounds() -> dict[str, SpecifierSet]:
    project = PYPROJECT["project"]
    bounds = {"python": SpecifierSet(project["requires-python"])}
    for group in [project["dependencies"], *project["optional-dependencies"].values()]:
        for requirement in map(Requirement, group):
            # The same package in the base and an extra must have one range.
            assert bounds.setdefault(requirement.name, requirement.specifier) == (
                requirement.specifier), requirement
    return bounds


def _ci_function(name: str) -> str:
    match = re.search(rf"^{name}\(\) \{{(.*?)\}}$", CI, re.MULTILINE | re.DOTALL)
    assert match, f".ci/run has no function {name}"
    return match.group(1)


def _second_stage_pins() -> dict[str, str]:
    """package -> version pinned by .ci/run's install_gpu_stack, its variables substituted."""
    variables = dict(re.findall(r"^([A-Z_]+)=([0-9.]+)$", CI, re.MULTILINE))
    body = re.sub(r"\$\{?([A-Z_]+)\}?", lambda m: variables[m.group(1)],
                  _ci_function("install_gpu_stack"))
    return dict(re.findall(r"""['"]([a-z0-9_-]+)==([0-9.]+)['"]""", body))


def test_supported_ranges_are_pyprojects():
    table, bounds = _versions_table(), _pyproject_bounds()
    assert list(table) == ["python", "torch", "triton", "transformers", "peft", "trl"]
    for package, (supported, _, _) in table.items():
        assert SpecifierSet(_code(supported)) == bounds[package], (
            f"README says {package} {supported}, pyproject.toml {bounds[package]}")


def test_first_stage_is_the_newest_release_of_the_readmes_install():
    # The first stage installs the package as the README's first command does, extras included,
    # so pip resolves the newest release within each bound.
    assert "pip install -e '.[test]'" in README.split("\n## ", 1)[0]
    assert "pip install --quiet -e '.[test]'" in _ci_function("install_main")
    test_extra = {Requirement(r).name for r in PYPROJECT["project"]["optional-dependencies"]["test"]}
    for package, (_, first, _) in _versions_table().items():
        if package == "python":
            assert first == "the runner's `python3`"
            continue
        assert first == NEWEST, (package, first)
        assert package in test_extra or package in {
            Requirement(r).name for r in PYPROJECT["project"]["dependencies"]}, package


def test_second_stage_is_ci_run_install_gpu_stack():
    pins, bounds = _second_stage_pins(), _pyproject_bounds()
    assert pins, "install_gpu_stack pins nothing"
    for package, (_, _, second) in _versions_table().items():
        if package == "python":
            assert second == "the runner's `python3`"
        elif package in pins:
            assert _code(second) == pins[package], f"README {second}, .ci/run {pins[package]}"
            assert pins[package] in bounds[package], (package, pins[package], bounds[package])
        else:
            assert second.startswith("not installed"), (package, second)
            assert not re.search(rf"\b{package}\b", _ci_function("install_gpu_stack")), package
    # And every pinned package of the second stage that the README's table names is in it.
    assert {"torch", "triton", "transformers", "peft"} <= set(pins)


def test_ci_runs_the_readmes_test_command():
    first_block = re.search(r"```bash\n(.*?)```", README, re.DOTALL).group(1)
    commands = [line.split("#", 1)[0].strip() for line in first_block.splitlines()]
    assert commands == ["pip install -e '.[test]' && python -m chronicals finetune",
                        "TRITON_INTERPRET=1 python -m pytest -q -n auto"]
    assert re.search(r"^\s+TRITON_INTERPRET=1 python -m pytest -q -n auto$", CI, re.MULTILINE)
