"""Every ```python block in README.md and docs/*.md runs as written (a file's blocks in order, in one
namespace, in a scratch folder), so the examples a user copies cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
# pages whose examples load the real MiniLM (seconds each): marked integration like the other real-model tests
REAL_MODEL_PAGES = {"README.md", "docs/lora_ga.md", "docs/pairs.md", "docs/tasks.md"}
PAGES = sorted(
    str(p.relative_to(REPO))
    for p in [REPO / "README.md", *(REPO / "docs").glob("*.md")]
    if p.name != "benchmarks.md" and BLOCK.search(p.read_text())
)


def python_blocks(page: str) -> list[str]:
    return BLOCK.findall((REPO / page).read_text())


@pytest.mark.parametrize(
    "page", [pytest.param(p, marks=pytest.mark.integration) if p in REAL_MODEL_PAGES else p for p in PAGES]
)
def test_every_python_example_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for index, code in enumerate(python_blocks(page)):
        try:
            exec(compile(code, f"{page}[python block {index + 1}]", "exec"), namespace)
        except Exception as err:  # name the block, keep the traceback
            raise AssertionError(f"{page}: python block {index + 1} failed: {err!r}") from err


def test_readme_opens_with_the_two_setup_commands():
    text = (REPO / "README.md").read_text()
    commands = re.findall(r"^```bash\n(.*?)\n```", text, re.S | re.M)
    assert len(commands) >= 2
    install_and_run, install_and_test = commands[0], commands[1]
    assert "\n" not in install_and_run and install_and_run.endswith("gradkit compare")
    assert "\n" not in install_and_test and "pytest" in install_and_test
    assert "torch==2.13.0" in install_and_run and "torch==2.13.0" in install_and_test
    assert text.index(install_and_run) < text.index("## ")  # before any section: what a newcomer sees first
