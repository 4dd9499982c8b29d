"""Config values checked before any data or model is built, each failure naming key, value and range.

yacs checks a value's type, not its range: ``OPTIM.BATCH_SIZE -1`` used to end deep in the data
loader ("collate_fn got an empty list of samples"), a crop size of 0 in a transform ("height and
width must be > 0"), a negative learning rate in torch ("Invalid learning rate"), minutes after
the run started and without naming the key. :func:`check_config_values` runs when
:func:`pretrain.config.load_config` builds a config, so every tool refuses such a value at once;
:func:`check_world_size` runs when a training run knows how many ranks it has.

Every failure is one :class:`~pretrain.config.ConfigError` listing all bad keys on one line:
``OPTIM.BATCH_SIZE is -1; must be an integer >= 1 (the global batch over all ranks)``.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable

from fvcore.common.config import CfgNode

from pretrain.config import ConfigError
from pretrain.data.build import FORMATS
from pretrain.data.checks import CHECK_IMAGES_MODES
from pretrain.data.transforms import TRANSFORMS, output_size
from pretrain.precision import AMP_DTYPES
from pretrain.schedule import DECAYS

# Names the builders accept (they have no constant to import); tests/test_config_checks.py
# checks these against pretrain.engine.optim and pretrain.models.factory.
OPTIMIZERS = ("sgd", "adamw")
DECODERS = ("beam_search", "nucleus_sampling", "beam_search_ours", "nucleus_sampling_ours")
CLASSIFICATION_LOSSES = ("k_hot_softmax", "binary_cross_entropy")
MIN_CAPTION_LENGTH = 3  # [SOS], one word, [EOS]


def _get(cfg: CfgNode, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _integer(low: int, high: int | None = None) -> tuple[Callable[[object], bool], str]:
    def ok(value) -> bool:
        return (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low
                and (high is None or value <= high))
    return ok, f"an integer >= {low}" + (f" and <= {high}" if high is not None else "")


def _number(low: float, high: float | None = None, low_open: bool = False, high_open: bool = False):
    def ok(value) -> bool:
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
            return False
        above = value > low if low_open else value >= low
        below = high is None or (value < high if high_open else value <= high)
        return above and below
    left, right = ("(" if low_open else "["), (")" if high_open or high is None else "]")
    return ok, f"a number in {left}{low:g}, {'inf' if high is None else f'{high:g}'}{right}"


def _choice(names: tuple[str, ...]) -> tuple[Callable[[object], bool], str]:
    return (lambda value: value in names), "one of " + ", ".join(names)


# key -> (test, allowed range, what the key is for)
RULES: dict[str, tuple[Callable[[object], bool], str, str]] = {
    "OPTIM.BATCH_SIZE": (*_integer(1), "the global batch over all ranks"),
    "OPTIM.NUM_ITERATIONS": (*_integer(1), "optimizer steps of the run"),
    "OPTIM.WARMUP_STEPS": (*_integer(0), "linear warm-up steps"),
    "OPTIM.LR": (*_number(0), "learning rate of the textual head"),
    "OPTIM.CNN_LR": (*_number(0), "learning rate of the visual backbone"),
    "OPTIM.WEIGHT_DECAY": (*_number(0), "weight decay"),
    "OPTIM.SGD_MOMENTUM": (*_number(0, 1, high_open=True), "SGD momentum"),
    "OPTIM.CLIP_GRAD_NORM": (*_number(0), "gradient norm clip (0: none)"),
    "OPTIM.OPTIMIZER_NAME": (*_choice(OPTIMIZERS), "optimizer"),
    "OPTIM.LR_DECAY_NAME": (*_choice(DECAYS), "learning-rate decay after warm-up"),
    "OPTIM.LR_GAMMA": (*_number(0, low_open=True), "multistep decay factor"),
    "OPTIM.LOOKAHEAD.ALPHA": (*_number(0, 1), "Lookahead step size"),
    "OPTIM.LOOKAHEAD.STEPS": (*_integer(1), "Lookahead inner steps"),
    "DATA.IMAGE_CROP_SIZE": (*_integer(1), "square crop in pixels"),
    "DATA.MAX_CAPTION_LENGTH": (*_integer(MIN_CAPTION_LENGTH), "tokens per caption with [SOS] and [EOS]"),
    "DATA.VOCAB_SIZE": (*_integer(1), "vocabulary size, or classes of the classification tasks"),
    "DATA.NUM_WORKERS": (*_integer(0), "DataLoader worker processes per rank"),
    "DATA.FORMAT": (*_choice(FORMATS), "dataset format"),
    "DATA.CHECK_IMAGES": (*_choice(CHECK_IMAGES_MODES), "images decoded by the data check"),
    "DATA.SHUFFLE_BUFFER": (*_integer(1), "shard shuffle buffer in samples"),
    "DATA.CAPTION_FIELD": ((lambda value: value == "txt" or (isinstance(value, str) and len(value) > 5
                                                               and value.startswith("json:"))),
                           "'txt' or 'json:FIELD'", "where a shard sample's captions are"),
    "DATA.MAX_BAD_FRACTION": (*_number(0, 1), "bad samples tolerated per rank"),
    "DATA.OPEN_SHARDS": (*_integer(1), "shards each reader interleaves"),
    "DATA.SHARD_RETRIES": (*_integer(0), "reads of a remote shard after a failed one"),
    "DATA.MAX_BAD_SHARD_FRACTION": (*_number(0, 1), "shards with an unreadable tail tolerated per rank"),
    "DATA.MASKED_LM.MASK_PROPORTION": (*_number(0, 1, low_open=True), "tokens chosen for masking"),
    "DATA.MASKED_LM.MASK_PROBABILITY": (*_number(0, 1), "chosen token -> [MASK]"),
    "DATA.MASKED_LM.REPLACE_PROBABILITY": (*_number(0, 1), "chosen token -> a random token"),
    "MODEL.TEXTUAL.DROPOUT": (*_number(0, 1, high_open=True), "dropout of the textual head"),
    "MODEL.DECODER.NAME": (*_choice(DECODERS), "caption decoder"),
    "MODEL.DECODER.BEAM_SIZE": (*_integer(1), "beams of beam search"),
    "MODEL.DECODER.NUCLEUS_SIZE": (*_number(0, 1, low_open=True), "probability mass of nucleus sampling"),
    "MODEL.DECODER.MAX_DECODING_STEPS": (*_integer(1), "tokens a decoder generates at most"),
    "MODEL.CLASSIFICATION_LOSS": (*_choice(CLASSIFICATION_LOSSES), "loss of the classification models"),
    "MODEL.CAPPA.PARALLEL_FRACTION": (*_number(0, 1), "batches decoded in parallel (CapPa)"),
    "ENGINE.CHECKPOINT_PERIOD": (*_integer(1), "iterations between checkpoints"),
    "ENGINE.KEEP_LAST_CHECKPOINTS": (*_integer(1), "checkpoints kept"),
    "ENGINE.LOG_PERIOD": (*_integer(1), "iterations between log lines"),
    "ENGINE.VAL_PERIOD": (*_integer(0), "iterations between validations (0: none)"),
    "ENGINE.GRAD_ACCUM_STEPS": (*_integer(1), "chunks each rank's batch is processed in"),
    "ENGINE.COMPILE_MIN_ITERATIONS": (*_integer(0), "iterations left from which ENGINE.COMPILE auto compiles"),
    "AMP_DTYPE": (*_choice(("auto", *AMP_DTYPES)), "mixed-precision type"),
}


def _describe(key: str, value, allowed: str, purpose: str) -> str:
    return f"{key} is {value!r}; must be {allowed} ({purpose})"


def value_problems(cfg: CfgNode) -> list[str]:
    """Every key of ``cfg`` whose value is out of range, one description each (empty: all fit)."""
    problems = []
    for key, (ok, allowed, purpose) in RULES.items():
        value = _get(cfg, key)  # every rule's key is a default: a KeyError here is a typo in RULES
        if not ok(value):
            problems.append(_describe(key, value, allowed, purpose))
    if problems:  # the relations below assume each key is in range
        return problems
    problems += name_problems(cfg)
    optim, decoder = cfg.OPTIM, cfg.MODEL.DECODER
    if optim.WARMUP_STEPS > optim.NUM_ITERATIONS:
        problems.append(_describe("OPTIM.WARMUP_STEPS", optim.WARMUP_STEPS,
                                  f"<= OPTIM.NUM_ITERATIONS ({optim.NUM_ITERATIONS})", "warm-up within the run"))
    if list(optim.LR_STEPS) != sorted(optim.LR_STEPS) or any(step < 0 for step in optim.LR_STEPS):
        problems.append(_describe("OPTIM.LR_STEPS", list(optim.LR_STEPS), "increasing iterations >= 0",
                                  "multistep milestones"))
    if optim.BATCH_SIZE % cfg.ENGINE.GRAD_ACCUM_STEPS:
        problems.append(_describe("OPTIM.BATCH_SIZE", optim.BATCH_SIZE,
                                  f"divisible by ENGINE.GRAD_ACCUM_STEPS ({cfg.ENGINE.GRAD_ACCUM_STEPS})",
                                  "each step's batch is split into that many chunks"))
    problems += transform_problems(cfg)
    if decoder.MAX_DECODING_STEPS > cfg.DATA.MAX_CAPTION_LENGTH:
        problems.append(_describe("MODEL.DECODER.MAX_DECODING_STEPS", decoder.MAX_DECODING_STEPS,
                                  f"<= DATA.MAX_CAPTION_LENGTH ({cfg.DATA.MAX_CAPTION_LENGTH})",
                                  "the decoder has that many learned positions"))
    return problems


def name_problems(cfg: CfgNode) -> list[str]:
    """The visual and textual model names, read by the same parsers the model builders use."""
    from pretrain.models.textual_heads import parse_textual_name
    from pretrain.models.visual_backbones import parse_visual_name
    from pretrain.models.vit import is_vit_name, parse_vit_name

    problems = []
    visual, textual = cfg.MODEL.VISUAL.NAME, cfg.MODEL.TEXTUAL.NAME
    parsers = [(parse_vit_name if is_vit_name(visual) else parse_visual_name, visual)]
    if textual != "none":  # the linear head of the classification tasks
        parsers.append((parse_textual_name, textual))
    for parse, name in parsers:
        try:
            parse(name)
        except ValueError as err:  # their messages name the key, the value and the accepted forms
            problems.append(str(err))
    return problems


def transform_problems(cfg: CfgNode) -> list[str]:
    """Image transform lists that pad with black borders (a centre crop larger than the resize
    before it), and, for a ViT, lists whose images are not a multiple of its patch size (timm
    refuses them mid-run). Lists with unknown names are left to the transform builder."""
    from pretrain.models.vit import requested_vit, vit_patch_size

    visual = cfg.MODEL.VISUAL.NAME
    arch = requested_vit(visual)
    patch = vit_patch_size(arch) if arch else None
    problems = []
    for key in ("IMAGE_TRANSFORM_TRAIN", "IMAGE_TRANSFORM_VAL", "IMAGE_TRANSFORM_CAPTION_EVAL"):
        names = list(cfg.DATA[key])
        if any(name.partition("@")[0] not in TRANSFORMS for name in names):
            continue
        side, padded = output_size(names, cfg.DATA.IMAGE_CROP_SIZE)
        if padded:
            problems.append(f"DATA.{key} is {names}: {padded}; crop at most the resized size (DATA.IMAGE_CROP_SIZE "
                            f"is {cfg.DATA.IMAGE_CROP_SIZE})")
        elif patch and (side is None or side % patch):
            made = "images of varying size" if side is None else f"{side} px images"
            problems.append(f"DATA.{key} is {names}: {made}, but {visual} needs a multiple of its patch size "
                            f"{patch}; end with a crop or global_resize to such a size (DATA.IMAGE_CROP_SIZE is "
                            f"{cfg.DATA.IMAGE_CROP_SIZE})")
    return problems


def check_config_values(cfg: CfgNode, source: str = "config") -> None:
    """Raise one :class:`ConfigError` naming every key of ``cfg`` whose value is out of range."""
    problems = value_problems(cfg)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


def check_world_size(cfg: CfgNode, world_size: int) -> None:
    """:class:`ConfigError` unless ``OPTIM.BATCH_SIZE`` splits evenly into ranks × accumulation steps."""
    accum = cfg.ENGINE.GRAD_ACCUM_STEPS
    if cfg.OPTIM.BATCH_SIZE % (world_size * accum):
        raise ConfigError(_describe(
            "OPTIM.BATCH_SIZE", cfg.OPTIM.BATCH_SIZE,
            f"divisible by {world_size} rank(s) x ENGINE.GRAD_ACCUM_STEPS {accum} = {world_size * accum}",
            "every rank takes an equal share, processed in equal chunks"))
