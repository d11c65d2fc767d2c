"""Shared by every benchmark: the machine description and the result-file format.

A result file ``benchmarks/results/<name>.json`` holds::

    {"name": ..., "title": ..., "claim": ..., "machine": {...}, "command": ...,
     "tables": [{"caption": ..., "columns": [...], "rows": [[...], ...]}],
     "plots": ["docs/img/<file>.png"], "notes": [...], "raw": {...}}

``benchmarks/render_docs.py`` turns every such file into a section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
IMAGES = ROOT / "docs" / "img"


def machine() -> dict[str, Any]:
    import torch

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "device": "cpu",
        "date": time.strftime("%Y-%m-%d"),
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def mean_and_sd(values: list[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation of ``values`` (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def write_result(name: str, result: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` atomically (machine and command filled in)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "name": name,
        "machine": machine(),
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        **result,
    }
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path.relative_to(ROOT)}")
    return path


def report(result: dict[str, Any] | None) -> None:
    """Write ``result`` to ``benchmarks/results/<name>.json`` (with the machine and the command); None
    writes nothing."""
    if result is not None:
        write_result(result["name"], result)


def save_figure(fig, path: Path) -> None:
    """Lay out, write ``path`` as PNG atomically (a temporary name, then a rename), and close ``fig``."""
    import matplotlib.pyplot as plt

    from gradkit.files import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def finished_run(folder: Path, cfg) -> dict[str, Any] | None:
    """The summary of a harness run already finished in ``folder`` with every setting of ``cfg``, else None.

    Makes a benchmark resumable: rerunning it after a cut only runs what is missing, and rerunning it
    after a change to its report only rewrites the report. ``lr=None`` (the method's default) matches
    whatever learning rate the run used; the run folder and method are where it lies, not settings.
    """
    if not (folder / "summary.json").exists():
        return None
    done = json.loads((folder / "config.json").read_text())
    for key, value in cfg.to_dict().items():
        if key in ("out", "method", "overwrite") or (key == "lr" and value is None):
            continue
        if done.get(key) != value:
            return None
    return json.loads((folder / "summary.json").read_text())


def load_timm_file(relative: str):
    """One file of timm (e.g. ``"utils/model_ema.py"``) loaded by path, or None without timm: importing
    the ``timm`` package itself needs torchvision, which these benchmarks do not install."""
    import importlib.util

    spec = importlib.util.find_spec("timm")
    if spec is None:
        return None
    path = Path(spec.submodule_search_locations[0]) / relative
    name = "timm_" + relative.replace("/", "_").removesuffix(".py") + "_standalone"
    mod_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module
