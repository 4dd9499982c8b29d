"""Shared fixtures.

detectron2 reads ``DETECTRON2_DATASETS`` once, when ``detectron2.data`` is first imported, so
the built-in dataset's root is chosen here, before any test module imports detectron2.
"""
import os
import sys
import tempfile
from pathlib import Path

import pytest

from tests.slurm_cluster import SLURM_UNAVAILABLE, slurm  # noqa: F401  (a fixture of every module)

# The tools' first import (tools/_bootstrap.py) must resolve when a test loads a tool as a module.
sys.path.append(str(Path(__file__).resolve().parents[1] / "tools"))

BUILTIN_ROOT = Path(tempfile.mkdtemp(prefix="virtex-d2-builtin-"))
os.environ["DETECTRON2_DATASETS"] = str(BUILTIN_ROOT)

# A tiny built-in dataset: enough images for every split file, small enough to build in a second.
TINY = {"num_train": 16, "num_val": 4, "image_size": 128, "seed": 0}


@pytest.fixture(scope="session")
def synthetic_root() -> Path:
    """Root of a tiny built-in dataset (COCO, LVIS and VOC layouts); also DETECTRON2_DATASETS."""
    from pretrain.data.synthetic import make_synthetic_dataset

    make_synthetic_dataset(BUILTIN_ROOT, **TINY)
    return BUILTIN_ROOT


# The one allowed skip: a `slurm` test where the local Slurm cannot be started (not root, no
# apt-get); the `slurm` fixture gives this reason.


def _slurm_unavailable(item, report) -> bool:
    return item.get_closest_marker("slurm") is not None and SLURM_UNAVAILABLE in str(report.longrepr)


# A skipped test hides a missing dependency or a broken environment: count it as a failure.
@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and not _slurm_unavailable(item, report):
        report.outcome = "failed"
        report.longrepr = f"test was skipped, which this project treats as a failure: {report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if report.skipped:
        report.outcome = "failed"
