"""Builders from a pretraining config to a model, one per task of the paper.

Each ``build_*`` function reads the config and calls the explicit-argument constructors of the
model classes, which remain usable without a config. Which builder serves which ``MODEL.NAME``
is the task table's business (:mod:`pretrain.tasks`), next to the dataset of each task.
"""
from __future__ import annotations

from fvcore.common.config import CfgNode

from pretrain.config import ConfigError
from pretrain.errors import BadValueError

from .captioning import CaptioningModel
from .classification import MultiLabelClassificationModel, TokenClassificationModel
from .decoding import BeamSearch, NucleusSampling
from .masked_lm import MaskedLMModel
from .textual_heads import LinearTextualHead, TransformerTextualHead, parse_textual_name
from .visual_backbones import TorchvisionVisualBackbone, parse_visual_name
from .vit import TimmViTBackbone, is_vit_name, parse_vit_name


def build_visual_backbone(cfg: CfgNode) -> TorchvisionVisualBackbone | TimmViTBackbone:
    """MODEL.VISUAL.NAME ``torchvision::<resnet>`` -> a ResNet from MODEL.VISUAL.{FEATURE_SIZE,
    PRETRAINED(_WEIGHTS), FROZEN, ZERO_INIT_RESIDUAL}; ``timm::<vit>`` -> a ViT for
    DATA.IMAGE_CROP_SIZE px images from MODEL.VISUAL.{FEATURE_SIZE, DROP_PATH, FROZEN}."""
    visual = cfg.MODEL.VISUAL
    if is_vit_name(visual.NAME):
        if visual.PRETRAINED:
            raise ConfigError("MODEL.VISUAL.PRETRAINED loads torchvision ResNet weights; a timm ViT starts from random init")
        return TimmViTBackbone(
            parse_vit_name(visual.NAME),
            visual.FEATURE_SIZE,
            image_size=cfg.DATA.IMAGE_CROP_SIZE,
            drop_path=visual.DROP_PATH,
            frozen=visual.FROZEN,
        )
    if visual.DROP_PATH:
        raise ConfigError(f"MODEL.VISUAL.DROP_PATH is for timm ViTs; '{visual.NAME}' has no drop path")
    return TorchvisionVisualBackbone(
        parse_visual_name(cfg.MODEL.VISUAL.NAME),
        cfg.MODEL.VISUAL.FEATURE_SIZE,
        pretrained=cfg.MODEL.VISUAL.PRETRAINED,
        frozen=cfg.MODEL.VISUAL.FROZEN,
        zero_init_residual=cfg.MODEL.VISUAL.ZERO_INIT_RESIDUAL,
        pretrained_weights=cfg.MODEL.VISUAL.PRETRAINED_WEIGHTS,
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

    ``beam_search`` and ``nucleus_sampling`` follow the official VirTex decoders token for token
    (no banned token; beam search feeds the generated tokens without [SOS] from its second step
    on); ``beam_search_ours`` and ``nucleus_sampling_ours`` always feed [SOS] and never generate
    padding/<unk>, [SOS] or [MASK] (rules in :mod:`pretrain.models.decoding`). Nucleus sampling
    is seeded with RANDOM_SEED.
    """
    decoder = cfg.MODEL.DECODER
    if decoder.MAX_DECODING_STEPS > cfg.DATA.MAX_CAPTION_LENGTH:
        raise BadValueError(
            f"MODEL.DECODER.MAX_DECODING_STEPS ({decoder.MAX_DECODING_STEPS}) exceeds the "
            f"{cfg.DATA.MAX_CAPTION_LENGTH} learned positions (DATA.MAX_CAPTION_LENGTH)"
        )
    beam = {"beam_size": decoder.BEAM_SIZE}
    nucleus = {"nucleus_size": decoder.NUCLEUS_SIZE, "seed": cfg.RANDOM_SEED}
    official = {"rules": "official"}
    ours = {
        "rules": "ours",
        "banned_tokens": (cfg.DATA.UNK_INDEX, cfg.DATA.SOS_INDEX, cfg.DATA.MASK_INDEX),
    }
    variants = {
        "beam_search": (BeamSearch, beam, official),
        "nucleus_sampling": (NucleusSampling, nucleus, official),
        "beam_search_ours": (BeamSearch, beam, ours),
        "nucleus_sampling_ours": (NucleusSampling, nucleus, ours),
    }
    if decoder.NAME not in variants:
        raise BadValueError(
            f"MODEL.DECODER.NAME '{decoder.NAME}' is unknown; use one of "
            + ", ".join(f"'{name}'" for name in variants)
        )
    decoder_class, specific, rules = variants[decoder.NAME]
    return decoder_class(
        sos_index=cfg.DATA.SOS_INDEX,
        eos_index=cfg.DATA.EOS_INDEX,
        max_steps=decoder.MAX_DECODING_STEPS,
        padding_index=cfg.DATA.UNK_INDEX,
        **specific,
        **rules,
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


def build_bicaptioning(cfg: CfgNode) -> CaptioningModel:
    """VirTex: forward and backward captioning heads over one visual backbone."""
    return _build_captioning(cfg, bidirectional=True)


def build_captioning(cfg: CfgNode) -> CaptioningModel:
    """Forward captioning only (the paper's "captioning" ablation)."""
    return _build_captioning(cfg, bidirectional=False)


def build_cappa_bicaptioning(cfg: CfgNode) -> CaptioningModel:
    """Bicaptioning with a fraction of CapPa-style parallel-prediction batches (not in the paper)."""
    return _build_captioning(cfg, bidirectional=True, parallel_fraction=cfg.MODEL.CAPPA.PARALLEL_FRACTION)


def build_masked_lm(cfg: CfgNode) -> MaskedLMModel:
    """Masked language modelling on captions, conditioned on the image."""
    return MaskedLMModel(build_visual_backbone(cfg), build_transformer_head(cfg))


def _linear_head(cfg: CfgNode, num_classes: int) -> LinearTextualHead:
    if cfg.MODEL.TEXTUAL.NAME != "none":
        raise BadValueError(
            f"MODEL.NAME '{cfg.MODEL.NAME}' uses a linear head: set MODEL.TEXTUAL.NAME to 'none', "
            f"not '{cfg.MODEL.TEXTUAL.NAME}'"
        )
    return LinearTextualHead(cfg.MODEL.VISUAL.FEATURE_SIZE, num_classes)


def build_token_classification(cfg: CfgNode) -> TokenClassificationModel:
    """Bag-of-words prediction of the caption's tokens."""
    return TokenClassificationModel(
        build_visual_backbone(cfg),
        _linear_head(cfg, cfg.DATA.VOCAB_SIZE),
        ignore_indices=(cfg.DATA.UNK_INDEX, cfg.DATA.SOS_INDEX, cfg.DATA.EOS_INDEX),
        loss=cfg.MODEL.CLASSIFICATION_LOSS,
    )


def build_multilabel_classification(cfg: CfgNode) -> MultiLabelClassificationModel:
    """Multi-label classification of the image's object categories: ``DATA.VOCAB_SIZE`` of them
    (80 for COCO), the number the dataset builder checks against the instances file."""
    return MultiLabelClassificationModel(
        build_visual_backbone(cfg), _linear_head(cfg, cfg.DATA.VOCAB_SIZE), loss=cfg.MODEL.CLASSIFICATION_LOSS
    )
