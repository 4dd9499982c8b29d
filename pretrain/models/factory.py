"""One factory from a pretraining config to a model: ``build_model(cfg)``.

A registry maps MODEL.NAME (the official names plus ``cappa_bicaptioning``) to a builder that
reads the config and calls the explicit-argument constructors of the model classes, which
remain usable without a config. New models register with ``@register_model("name")``.
"""
from __future__ import annotations

from collections.abc import Callable

from fvcore.common.config import CfgNode
from torch import nn

from .captioning import CaptioningModel
from .classification import MultiLabelClassificationModel, TokenClassificationModel
from .decoding import BeamSearch, NucleusSampling
from .masked_lm import MaskedLMModel
from .textual_heads import LinearTextualHead, TransformerTextualHead, parse_textual_name
from .visual_backbones import TorchvisionVisualBackbone, parse_visual_name

ModelBuilder = Callable[[CfgNode], nn.Module]
_MODEL_BUILDERS: dict[str, ModelBuilder] = {}

#: Number of COCO object categories predicted by ``multilabel_classification``.
NUM_COCO_CATEGORIES = 80


def register_model(*names: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator registering ``builder(cfg) -> nn.Module`` under each MODEL.NAME in ``names``."""

    def decorate(builder: ModelBuilder) -> ModelBuilder:
        for name in names:
            if name in _MODEL_BUILDERS:
                raise ValueError(f"model name '{name}' is already registered")
            _MODEL_BUILDERS[name] = builder
        return builder

    return decorate


def list_models() -> list[str]:
    """Every accepted MODEL.NAME, sorted."""
    return sorted(_MODEL_BUILDERS)


def build_model(cfg: CfgNode) -> nn.Module:
    """The model named by ``cfg.MODEL.NAME``, freshly initialised, on the CPU in train mode."""
    name = cfg.MODEL.NAME
    if name not in _MODEL_BUILDERS:
        raise ValueError(f"MODEL.NAME '{name}' is unknown; choose one of {', '.join(list_models())}")
    if name != "cappa_bicaptioning" and cfg.MODEL.CAPPA.PARALLEL_FRACTION != 0.0:
        raise ValueError(
            f"MODEL.CAPPA.PARALLEL_FRACTION is only used by MODEL.NAME 'cappa_bicaptioning', not '{name}'"
        )
    return _MODEL_BUILDERS[name](cfg)


def build_visual_backbone(cfg: CfgNode) -> TorchvisionVisualBackbone:
    """MODEL.VISUAL.{NAME, FEATURE_SIZE, PRETRAINED, FROZEN, ZERO_INIT_RESIDUAL} -> backbone."""
    return TorchvisionVisualBackbone(
        parse_visual_name(cfg.MODEL.VISUAL.NAME),
        cfg.MODEL.VISUAL.FEATURE_SIZE,
        pretrained=cfg.MODEL.VISUAL.PRETRAINED,
        frozen=cfg.MODEL.VISUAL.FROZEN,
        zero_init_residual=cfg.MODEL.VISUAL.ZERO_INIT_RESIDUAL,
    )


def build_transformer_head(cfg: CfgNode) -> TransformerTextualHead:
    """MODEL.TEXTUAL.{NAME, DROPOUT} and the DATA vocabulary settings -> transformer head."""
    spec = parse_textual_name(cfg.MODEL.TEXTUAL.NAME)
    return TransformerTextualHead(
        visual_feature_size=cfg.MODEL.VISUAL.FEATURE_SIZE,
        vocab_size=cfg.DATA.VOCAB_SIZE,
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        attention_heads=spec.attention_heads,
        feedforward_size=spec.feedforward_size,
        dropout=cfg.MODEL.TEXTUAL.DROPOUT,
        norm_first=spec.norm_first,
        max_caption_length=cfg.DATA.MAX_CAPTION_LENGTH,
        padding_idx=cfg.DATA.UNK_INDEX,
    )


def build_decoder(cfg: CfgNode) -> BeamSearch | NucleusSampling:
    """MODEL.DECODER -> beam search or nucleus sampling over the forward head.

    Never generated: padding/<unk>, [SOS], [MASK]. Nucleus sampling is seeded with RANDOM_SEED.
    """
    decoder = cfg.MODEL.DECODER
    if decoder.MAX_DECODING_STEPS > cfg.DATA.MAX_CAPTION_LENGTH:
        raise ValueError(
            f"MODEL.DECODER.MAX_DECODING_STEPS ({decoder.MAX_DECODING_STEPS}) exceeds the "
            f"{cfg.DATA.MAX_CAPTION_LENGTH} learned positions (DATA.MAX_CAPTION_LENGTH)"
        )
    common = {
        "sos_index": cfg.DATA.SOS_INDEX,
        "eos_index": cfg.DATA.EOS_INDEX,
        "max_steps": decoder.MAX_DECODING_STEPS,
        "banned_tokens": (cfg.DATA.UNK_INDEX, cfg.DATA.SOS_INDEX, cfg.DATA.MASK_INDEX),
        "padding_index": cfg.DATA.UNK_INDEX,
    }
    if decoder.NAME == "beam_search":
        return BeamSearch(beam_size=decoder.BEAM_SIZE, **common)
    if decoder.NAME == "nucleus_sampling":
        return NucleusSampling(nucleus_size=decoder.NUCLEUS_SIZE, seed=cfg.RANDOM_SEED, **common)
    raise ValueError(
        f"MODEL.DECODER.NAME '{decoder.NAME}' is unknown; use 'beam_search' or 'nucleus_sampling'"
    )


def _build_captioning(cfg: CfgNode, bidirectional: bool, parallel_fraction: float = 0.0) -> CaptioningModel:
    return CaptioningModel(
        build_visual_backbone(cfg),
        build_transformer_head(cfg),
        bidirectional=bidirectional,
        decoder=build_decoder(cfg),
        mask_index=cfg.DATA.MASK_INDEX,
        parallel_fraction=parallel_fraction,
    )


@register_model("virtex", "bicaptioning")
def _bicaptioning(cfg: CfgNode) -> CaptioningModel:
    return _build_captioning(cfg, bidirectional=True)


@register_model("captioning")
def _captioning(cfg: CfgNode) -> CaptioningModel:
    return _build_captioning(cfg, bidirectional=False)


@register_model("cappa_bicaptioning")
def _cappa_bicaptioning(cfg: CfgNode) -> CaptioningModel:
    return _build_captioning(cfg, bidirectional=True, parallel_fraction=cfg.MODEL.CAPPA.PARALLEL_FRACTION)


@register_model("masked_lm")
def _masked_lm(cfg: CfgNode) -> MaskedLMModel:
    return MaskedLMModel(build_visual_backbone(cfg), build_transformer_head(cfg))


def _linear_head(cfg: CfgNode, num_classes: int) -> LinearTextualHead:
    if cfg.MODEL.TEXTUAL.NAME != "none":
        raise ValueError(
            f"MODEL.NAME '{cfg.MODEL.NAME}' uses a linear head: set MODEL.TEXTUAL.NAME to 'none', "
            f"not '{cfg.MODEL.TEXTUAL.NAME}'"
        )
    return LinearTextualHead(cfg.MODEL.VISUAL.FEATURE_SIZE, num_classes)


@register_model("token_classification")
def _token_classification(cfg: CfgNode) -> TokenClassificationModel:
    return TokenClassificationModel(
        build_visual_backbone(cfg),
        _linear_head(cfg, cfg.DATA.VOCAB_SIZE),
        ignore_indices=(cfg.DATA.UNK_INDEX, cfg.DATA.SOS_INDEX, cfg.DATA.EOS_INDEX),
    )


@register_model("multilabel_classification")
def _multilabel_classification(cfg: CfgNode) -> MultiLabelClassificationModel:
    return MultiLabelClassificationModel(
        build_visual_backbone(cfg), _linear_head(cfg, NUM_COCO_CATEGORIES)
    )
