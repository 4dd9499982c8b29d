"""The environment that `make setup` builds: detectron2 importable and nothing shadowing our code."""
import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_project_packages_and_detectron2_import():
    import detectron2

    import detectron2_ext  # noqa: F401
    import pretrain  # noqa: F401

    assert detectron2.__version__


def test_collect_env_runs():
    result = subprocess.run([sys.executable, "-m", "detectron2.utils.collect_env"], capture_output=True, text=True, check=False,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "detectron2" in result.stdout and "PyTorch" in result.stdout


def test_no_installed_tools_package_shadows_ours():
    spec = importlib.util.find_spec("tools")
    if spec is not None:  # our tools/ folder is a plain directory of scripts, not an installed package
        locations = list(spec.submodule_search_locations or [spec.origin])
        assert all(Path(p).resolve().is_relative_to(REPO) for p in locations), locations
