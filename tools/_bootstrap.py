"""Imported first by every script in tools/, before any project or third-party package.

- Python puts a script's own folder first on ``sys.path``, so ``tools/pretrain.py`` would
  shadow the ``pretrain`` package in every tool: the checkout goes first on the path (which
  also serves a checkout not installed with ``pip install -e .``) and tools/ last, where this
  module can still be found by processes that tools start with multiprocessing's spawn.
- detectron2 and fvcore script a few functions with ``torch.jit.script`` when they are imported,
  and torch 2.x warns that it is deprecated: a warning about their code that no user can act on,
  printed before every tool's own output. Only that warning is silenced.
"""
import sys
import warnings
from pathlib import Path

_TOOLS = Path(__file__).resolve().parent
sys.path[:] = [str(_TOOLS.parent)] + [entry for entry in sys.path if Path(entry or ".").resolve() != _TOOLS] + [str(_TOOLS)]

warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
