"""virtex-d2's detectron2 extension: config keys, registered heads, safe checkpoint loading,
backbone conversion and evaluation for VirTex downstream transfer (reports and the pipeline
live above it, in ``virtex_d2``).

Importing the package registers its components with detectron2's registries.
"""
from . import (
    roi_heads,  # noqa: F401  (registers Res5ROIHeadsExtraNorm)
    vit_backbone,  # noqa: F401  (registers build_vitdet_backbone)
)
from .config import add_virtex_config, load_config

__all__ = ["add_virtex_config", "load_config"]
