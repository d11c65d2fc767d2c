"""A clone of the repository with nothing beside it runs its tests, documentation examples and
benchmarks: nothing they read lives outside the repository, and every data file they name is in it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"
PACKAGE_DATA = REPO / "src" / "gradkit" / "data"
CHECKED = ("tests", "docs", "src", "benchmarks", "README.md")
TEXT_SUFFIXES = {".py", ".md", ".json", ".toml", ".txt", ".sh", ".cfg", ".yaml", ".yml"}
OUTSIDE = ("../" + "shared", "shared" + "/data", '"shared" / "data"', "'shared' / 'data'")
SETS = sorted(p.name for p in DATA.iterdir() if p.is_dir()) if DATA.is_dir() else []
SET_NAMES = "|".join(map(re.escape, SETS)) or "(?!)"
# a file of a data set named in code or prose: "rte" / "train.tsv", data/rte/train.tsv, "cola/dev.tsv"
NAMED_FILE = re.compile(
    rf"""(?:["']({SET_NAMES})["']\s*/\s*["']([\w.-]+\.\w+)["'])|(?:\b({SET_NAMES})/([\w.-]+\.(?:tsv|txt|csv|jsonl?)))"""
)


def tracked_files() -> list[Path]:
    """The files git tracks under the checked paths (every file there when this is not a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--", *CHECKED], cwd=REPO, capture_output=True, check=True, text=True
        ).stdout
        files = [REPO / name for name in out.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        files = [
            p for top in CHECKED for p in ([REPO / top] if top.endswith(".md") else (REPO / top).rglob("*"))
        ]
    return [p for p in files if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.name == "README.md")]


def test_the_data_sets_are_in_the_repository():
    assert {"sst2", "rte", "stsb", "cola", "tinyshakespeare"} <= set(SETS)
    assert (DATA / "README.md").is_file()
    for name in SETS:
        assert any((DATA / name).iterdir()), f"data/{name} is empty"


def test_nothing_names_a_folder_outside_the_repository():
    offenders = [
        f"{path.relative_to(REPO)}: {needle}"
        for path in tracked_files()
        if path.name != Path(__file__).name  # the needles are spelled here
        for needle in OUTSIDE
        if needle in path.read_text(encoding="utf-8", errors="replace")
    ]
    assert not offenders, "names a folder outside the repository:\n" + "\n".join(offenders)


def test_every_data_file_a_test_or_example_names_exists():
    named = set()
    for path in tracked_files():
        if path.suffix not in {".py", ".md"} or path.name == Path(__file__).name:
            continue
        for match in NAMED_FILE.finditer(path.read_text(encoding="utf-8", errors="replace")):
            folder, name = (
                (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
            )
            named.add((str(path.relative_to(REPO)), folder, name))
    assert any(where.startswith("tests") for where, _, _ in named), "found no data file named by a test"
    missing = [
        f"{where}: {folder}/{name}"
        for where, folder, name in sorted(named)
        if not (DATA / folder / name).is_file() and not (PACKAGE_DATA / folder / name).is_file()
    ]
    assert not missing, "names a data file the repository does not hold:\n" + "\n".join(missing)


def test_the_data_folder_is_tracked_and_not_ignored():
    try:
        tracked = subprocess.run(
            ["git", "ls-files", "--", "data"], cwd=REPO, capture_output=True, check=True, text=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    on_disk = {str(p.relative_to(REPO)) for p in DATA.rglob("*") if p.is_file()}
    assert on_disk <= set(tracked), f"untracked or ignored under data/: {sorted(on_disk - set(tracked))}"
