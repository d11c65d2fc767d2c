"""The library knows no harness: no module outside the CLI and ``gradkit.train`` imports them, and the
noise-scale modules do not import each other at load time."""

from __future__ import annotations

import ast
from pathlib import Path

import gradkit

SRC = Path(gradkit.__file__).parent
HARNESS = (
    "gradkit.train",
    "gradkit.cli",
    "gradkit.scaling.cli",
    "gradkit.diagnose_cli",
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


def test_noise_scale_and_per_example_do_not_import_each_other_at_load_time():
    scaling = SRC / "scaling"
    assert "gradkit.scaling.per_example" not in _imports(scaling / "noise_scale.py", load_time_only=True)
    assert "gradkit.scaling.noise_scale" not in _imports(scaling / "per_example.py", load_time_only=True)
