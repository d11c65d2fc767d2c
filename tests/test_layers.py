"""The library knows no harness: no module outside the CLI and ``gradkit.train`` imports them, and the
noise-scale recorders do not import the estimator they feed."""

from __future__ import annotations

import ast
from pathlib import Path

import gradkit

SRC = Path(gradkit.__file__).parent
HARNESS = (
    "gradkit.train",
    "gradkit.cli",
)  # the harness and the commands


def _imports(path: Path, *, load_time_only: bool) -> set[str]:
    """Modules imported by ``path``: everywhere, or only by statements that run when it is imported
    (module level, outside ``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text())
    nodes = ast.walk(tree) if not load_time_only else _load_time(tree.body)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _load_time(body: list[ast.stmt]):
    for node in body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        yield node
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            yield from _load_time(getattr(node, "body", []) + getattr(node, "orelse", []))


def test_library_modules_import_no_harness():
    offenders = {}
    for path in SRC.rglob("*.py"):
        module = "gradkit." + ".".join(path.relative_to(SRC).with_suffix("").parts)
        if module.startswith(HARNESS) or module in ("gradkit.__init__", "gradkit.__main__"):
            continue
        bad = {name for name in _imports(path, load_time_only=False) if name.startswith(HARNESS)}
        if bad:
            offenders[module] = sorted(bad)
    assert offenders == {}


def test_the_noise_scale_recorders_do_not_import_the_estimator():
    scaling = SRC / "scaling"
    for recorder in ("per_example.py", "accumulation.py"):
        assert "gradkit.scaling.noise_scale" not in _imports(scaling / recorder, load_time_only=False)
