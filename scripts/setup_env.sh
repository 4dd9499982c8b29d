#!/usr/bin/env bash
# Creates (or updates) the project's virtual environment: torch, this project in editable
# mode, and detectron2; on Debian/Ubuntu as root also tcmalloc for CPU training. Idempotent: a second run only checks what is already there.
#
#   VENV=.venv               where the environment lives
#   PYTHON=python3           the interpreter the venv is made from (3.10-3.13; tested: 3.11, 3.13)
#   DETECTRON2_SOURCE=auto   git: install detectron2 from its git repository (needs internet)
#                            wheel: the offline route (pure-Python detectron2 from sal-detectron2)
#                            auto: git when github.com answers, wheel otherwise
set -euo pipefail

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
DETECTRON2_SOURCE=${DETECTRON2_SOURCE:-auto}
DETECTRON2_GIT=${DETECTRON2_GIT:-https://github.com/facebookresearch/detectron2.git}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}

say() { printf '[setup] %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)

have_torch=$("$PY" -c 'import torch, torchvision; print(torch.__version__.split("+")[0], torchvision.__version__.split("+")[0])' 2>/dev/null || true)
if [ "$have_torch" != "$(echo "$TORCH_SPEC" | sed -E 's/[a-z]+==//g')" ]; then
    say "installing $TORCH_SPEC"
    # shellcheck disable=SC2086
    "${PIP[@]}" install $TORCH_SPEC
fi

# detectron2 imports pkg_resources, which setuptools>=81 no longer ships.
"${PIP[@]}" install "setuptools<81" wheel
say "installing virtex-d2 (editable) with its dev extras"
"${PIP[@]}" install -e ".[dev]"

SP=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

if ! "$PY" -c 'import detectron2' 2>/dev/null; then
    if [ "$DETECTRON2_SOURCE" = auto ]; then
        if timeout 15 git ls-remote "$DETECTRON2_GIT" HEAD >/dev/null 2>&1; then
            DETECTRON2_SOURCE=git
        else
            DETECTRON2_SOURCE=wheel
        fi
    fi
    case "$DETECTRON2_SOURCE" in
        git)
            say "installing detectron2 from $DETECTRON2_GIT (compiles its C++/CUDA ops)"
            "${PIP[@]}" install --no-build-isolation "git+$DETECTRON2_GIT"
            ;;
        wheel)
            say "github is out of reach: installing the pure-Python detectron2 from sal-detectron2==0.7.2"
            # The wheel is tagged for Python 3.10, but its Python code runs on 3.11; its compiled
            # ops (detectron2._C) do not load, and nothing in this project needs them.
            "${PIP[@]}" install --no-deps --only-binary=:all: --python-version 3.10 \
                --upgrade --target "$SP" sal-detectron2==0.7.2 2>&1 | grep -v 'already exists' || true
            # The wheel also ships a top-level package named `tools` that would shadow ours.
            if [ -f "$SP/tools/train_net.py" ] && [ -f "$SP/tools/lazyconfig_train_net.py" ]; then
                rm -rf "$SP/tools"
                say "removed detectron2's top-level 'tools' package from site-packages (it shadows ours)"
            fi
            "${PIP[@]}" install yacs tabulate cloudpickle termcolor omegaconf hydra-core black
            ;;
        *)
            echo "DETECTRON2_SOURCE must be auto, git or wheel (got '$DETECTRON2_SOURCE')" >&2
            exit 2
            ;;
    esac
fi

"$PY" - <<'PY'
import detectron2, torch
try:
    from detectron2 import _C  # noqa: F401
    ops = "present"
except ImportError:
    ops = "absent (pure-Python install: fast COCO eval, rotated boxes and deformable conv are unavailable)"
import pretrain, detectron2_ext, virtex_d2  # noqa: F401
from pretrain.models.vit import import_timm  # timm without its deprecation warnings
print(f"[setup] timm {import_timm().__version__} (ViT backbones, detectron2's ViT)")
print(f"[setup] detectron2 {detectron2.__version__} from {detectron2.__file__.rsplit('/', 2)[0]}")
print(f"[setup] detectron2 compiled ops: {ops}")
print(f"[setup] torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
PY
# Optional: tcmalloc trains as fast as tuned glibc malloc with a lower memory peak (the
# launchers preload it when installed, see pretrain/engine/malloc.py).
if [ "$(uname -s)" = Linux ] && ! bash scripts/apt_install.sh libtcmalloc-minimal4 \
        sh -c 'ldconfig -p | grep -q libtcmalloc_minimal'; then
    say "note: tcmalloc is not installed; CPU training falls back to tuned glibc malloc (higher memory peak)"
fi
say "done: activate with 'source $VENV/bin/activate'"
