"""The packages' layering: `chronicals` (ops, packing, the training step, the CLI) sits below
`compile_passes` (the backend's graph passes), which imports it; never the other way round."""

import ast
from pathlib import Path

import chronicals

PACKAGE = Path(chronicals.__file__).parent

# The one import allowed: a source checkout has no `torch_dynamo_backends` entry point, so
# `import chronicals` registers backend="chronicals" itself (a plugin hook, called once at import).
ALLOWED = {("__init__.py", "_register_backend_for_source_checkout")}


def _imports_of_compile_passes(path: Path) -> list[tuple[int, str | None]]:
    """(line, enclosing top-level function or None) of each import of `compile_passes` in path."""
    found = []
    for top in ast.parse(path.read_text(), filename=str(path)).body:
        function = top.name if isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
        for node in ast.walk(top):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module or ""]
            else:
                continue
            if any(m == "compile_passes" or m.startswith("compile_passes.") for m in modules):
                found.append((node.lineno, function))
    return found


def test_chronicals_does_not_import_compile_passes():
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) > 10, f"expected the package's modules under {PACKAGE}, found {sources}"
    offending = [
        f"{path.relative_to(PACKAGE)}:{line}"
        for path in sources
        for line, function in _imports_of_compile_passes(path)
        if (str(path.relative_to(PACKAGE)), function) not in ALLOWED
    ]
    assert offending == [], f"chronicals/ imports compile_passes at {offending}"


def test_the_check_finds_an_import(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from compile_passes._torch_api import x\n"
                      "import compile_passes.backend\nimport compile_passes_other\n")
    assert _imports_of_compile_passes(source) == [(2, "f"), (3, None)]
