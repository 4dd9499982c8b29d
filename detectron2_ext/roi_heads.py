"""ROI heads registered with detectron2's ``ROI_HEADS_REGISTRY``."""
from detectron2.layers import get_norm
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.roi_heads import Res5ROIHeads


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """The C4 ROI head whose res5 stage ends with one more normalisation layer.

    With a BN-normalised backbone (SyncBN fine-tuning, as in the VirTex and MoCo VOC
    protocols) the box predictor would otherwise see un-normalised res5 features. The layer is
    appended as submodule ``res5.norm``, its type follows ``MODEL.RESNETS.NORM``, and it has no
    counterpart in pretrained weights, so it starts from its default initialisation.
    """

    @classmethod
    def _build_res5_block(cls, cfg):
        stage, out_channels = super()._build_res5_block(cfg)
        stage.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
        return stage, out_channels
