"""Pretraining configuration: the official VirTex keys and defaults, plus this project's own.

Config files use fvcore's YAML format with ``_BASE_`` inheritance, so every config of the
official model zoo loads unchanged. Keys that the official code does not have live under
``ENGINE``, ``MODEL.CAPPA`` and a few DATA entries; they default to the official behaviour.
An unknown or misspelt key in a file or override list raises :class:`ConfigError` naming it.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from contextlib import contextmanager

from fvcore.common.config import CfgNode

from pretrain.errors import InputError


class ConfigError(InputError, ValueError):
    """A config file or override that does not fit the schema."""


def get_default_config() -> CfgNode:
    """A fresh, mutable config holding every key with its default value."""
    C = CfgNode()
    C.RANDOM_SEED = 0  # seeds python, numpy and torch; each rank adds its rank
    C.AMP = True  # mixed precision where it pays: see AMP_DTYPE
    # auto: fp16 + GradScaler on accelerators; bf16 on CPUs with native bf16 (AVX512-BF16/AMX),
    # fp32 on other CPUs, where bf16 is emulated and several times slower. bf16 | fp16: forced.
    C.AMP_DTYPE = "auto"
    C.CUDNN_BENCHMARK = True
    C.CUDNN_DETERMINISTIC = False

    C.DATA = CfgNode()
    C.DATA.ROOT = "datasets/coco"  # folder with {train,val}2017/ and annotations/
    C.DATA.TOKENIZER_MODEL = "datasets/vocab/coco_10k.model"
    C.DATA.VOCAB_SIZE = 10000
    C.DATA.UNK_INDEX = 0  # also the padding index
    C.DATA.SOS_INDEX = 1
    C.DATA.EOS_INDEX = 2
    C.DATA.MASK_INDEX = 3
    C.DATA.IMAGE_CROP_SIZE = 224
    C.DATA.MAX_CAPTION_LENGTH = 30
    C.DATA.IMAGE_TRANSFORM_TRAIN = ["random_resized_crop", "horizontal_flip", "color_jitter", "normalize"]
    C.DATA.IMAGE_TRANSFORM_VAL = ["smallest_resize", "center_crop", "normalize"]
    # Not an official key: what the caption tools (caption.py, eval_captioning.py,
    # visualize_attention.py) feed the model; the official eval_captioning.py resizes the
    # shorter side to 256 and crops the centre 224 whatever the config says.
    C.DATA.IMAGE_TRANSFORM_CAPTION_EVAL = ["smallest_resize@256", "center_crop", "normalize"]
    C.DATA.MASKED_LM = CfgNode()
    C.DATA.MASKED_LM.MASK_PROPORTION = 0.15  # fraction of tokens chosen for masking
    C.DATA.MASKED_LM.MASK_PROBABILITY = 0.85  # chosen token -> [MASK]
    C.DATA.MASKED_LM.REPLACE_PROBABILITY = 0.10  # chosen token -> random token
    # Not in the official code:
    C.DATA.NUM_WORKERS = 2  # DataLoader worker processes per rank
    C.DATA.SKIP_BAD_IMAGES = False  # True: skip (and count) unreadable images instead of failing
    # coco: DATA.ROOT in the COCO 2017 layout | webdataset: tar shards ({key}.jpg/.txt/.json, the
    # img2dataset layout), read by pretrain/data/shards.py as an endless seeded stream
    C.DATA.FORMAT = "coco"
    # webdataset: train and val shards, each a brace pattern ("corpus/{00000..00999}.tar"), a
    # .txt file listing one shard a line, a URL ("https://host/{0..9}.tar") or "pipe:COMMAND"
    C.DATA.SHARDS = ""
    C.DATA.VAL_SHARDS = ""
    C.DATA.CAPTION_FIELD = "txt"  # webdataset: "txt" (each line of {key}.txt a caption) | "json:FIELD"
    # webdataset: samples a reader holds to shuffle, split evenly among its open shards
    C.DATA.SHUFFLE_BUFFER = 1000
    C.DATA.MAX_BAD_FRACTION = 0.001  # webdataset: stop once more of a rank's samples than this were bad
    # webdataset: shards each reader keeps open and draws from at random (seeded), so that one
    # batch mixes samples of several shards (1: one shard after the other)
    C.DATA.OPEN_SHARDS = 4
    # webdataset: a shard whose tail is unreadable (a cut or garbage) gives its samples up to the
    # fault; stop once more than this fraction of the distinct shards a rank read had such a tail
    C.DATA.MAX_BAD_SHARD_FRACTION = 0.1
    C.DATA.SHARD_RETRIES = 3  # reads of a remote shard (URL, pipe:), or of any the machine failed, retried 1, 2, 4 s apart
    # Images decoded by the data check before a run (pretrain.data.checks): "sample" (1000 per
    # split, so all of a small split and not 118K COCO images before every run), "all" or "none".
    C.DATA.CHECK_IMAGES = "sample"

    C.MODEL = CfgNode()
    # virtex | bicaptioning | captioning | token_classification | multilabel_classification
    # | masked_lm | cappa_bicaptioning
    C.MODEL.NAME = "virtex"
    C.MODEL.VISUAL = CfgNode()
    C.MODEL.VISUAL.NAME = "torchvision::resnet50"
    C.MODEL.VISUAL.FEATURE_SIZE = 2048
    C.MODEL.VISUAL.PRETRAINED = False  # ImageNet weights cannot be fetched offline; kept for config parity
    # Which torchvision ImageNet weights PRETRAINED loads: IMAGENET1K_V1 is what the official
    # pretrained=True gives (76.1 % top-1 for ResNet-50); IMAGENET1K_V2 (80.9 %) is an opt-in.
    C.MODEL.VISUAL.PRETRAINED_WEIGHTS = "IMAGENET1K_V1"
    C.MODEL.VISUAL.FROZEN = False
    # The last BatchNorm of every residual block starts at zero, as official; fine over 500k
    # iterations, but a run of a few hundred barely opens those branches (docs/demo_history.md).
    C.MODEL.VISUAL.ZERO_INIT_RESIDUAL = True
    # Not in the official code: stochastic depth of a timm ViT (MODEL.VISUAL.NAME timm::<vit>);
    # ResNets have none, so it must stay 0 for them.
    C.MODEL.VISUAL.DROP_PATH = 0.0
    C.MODEL.TEXTUAL = CfgNode()
    C.MODEL.TEXTUAL.NAME = "transdec_postnorm::L1_H2048_A32_F8192"  # "none" for *_classification
    C.MODEL.TEXTUAL.DROPOUT = 0.1
    C.MODEL.DECODER = CfgNode()
    # beam_search | nucleus_sampling: the official decoders, token for token;
    # beam_search_ours | nucleus_sampling_ours: [SOS] in every prefix, no <unk>/[SOS]/[MASK]
    # (pretrain.models.decoding says how the two rule sets differ)
    C.MODEL.DECODER.NAME = "beam_search"
    C.MODEL.DECODER.BEAM_SIZE = 5
    C.MODEL.DECODER.NUCLEUS_SIZE = 0.9
    C.MODEL.DECODER.MAX_DECODING_STEPS = 30
    # Loss of the *_classification models: k_hot_softmax (official: cross-entropy against a
    # uniform K-hot target) | binary_cross_entropy (not in the official code: a sigmoid per class).
    C.MODEL.CLASSIFICATION_LOSS = "k_hot_softmax"
    # Not in the official code: CapPa-style parallel prediction (Tschannen et al. 2023).
    C.MODEL.CAPPA = CfgNode()
    C.MODEL.CAPPA.PARALLEL_FRACTION = 0.0  # fraction of batches decoded from fully masked inputs

    C.OPTIM = CfgNode()
    C.OPTIM.OPTIMIZER_NAME = "sgd"  # sgd | adamw
    C.OPTIM.SGD_MOMENTUM = 0.9
    C.OPTIM.WEIGHT_DECAY = 0.0001
    C.OPTIM.NO_DECAY = ".*textual.(embedding|transformer).*(norm.*|bias)"
    C.OPTIM.CLIP_GRAD_NORM = 10.0
    C.OPTIM.LOOKAHEAD = CfgNode()
    C.OPTIM.LOOKAHEAD.USE = True
    C.OPTIM.LOOKAHEAD.ALPHA = 0.5
    C.OPTIM.LOOKAHEAD.STEPS = 5
    C.OPTIM.BATCH_SIZE = 256  # global: split evenly across ranks
    C.OPTIM.CNN_LR = 0.2
    C.OPTIM.LR = 0.001
    C.OPTIM.NUM_ITERATIONS = 500000
    C.OPTIM.WARMUP_STEPS = 10000
    C.OPTIM.LR_DECAY_NAME = "cosine"  # none | linear | cosine | multistep
    C.OPTIM.LR_STEPS = []
    C.OPTIM.LR_GAMMA = 0.1

    # Not in the official code: how the training run is executed and recorded.
    C.ENGINE = CfgNode()
    C.ENGINE.CHECKPOINT_PERIOD = 2000
    C.ENGINE.KEEP_LAST_CHECKPOINTS = 5
    C.ENGINE.PINNED_CHECKPOINTS = []  # iterations whose checkpoints are never deleted
    C.ENGINE.LOG_PERIOD = 20
    C.ENGINE.VAL_PERIOD = 2000  # 0 disables periodic validation
    C.ENGINE.VAL_CAPTION_METRICS = True  # decode the val split and report CIDEr-D/BLEU-4
    C.ENGINE.CHANNELS_LAST = True
    # torch.compile the training step: auto = when the run has ENGINE.COMPILE_MIN_ITERATIONS
    # iterations left and the device can build kernels (pretrain/engine/compile.py) | True | False
    C.ENGINE.COMPILE = "auto"
    C.ENGINE.COMPILE_MIN_ITERATIONS = 2000
    C.ENGINE.GRAD_ACCUM_STEPS = 1  # each rank's batch is processed in this many chunks per step
    return C


def _check_keys(cfg: CfgNode, overrides: Sequence[str], source: str) -> None:
    for key in overrides[0::2]:
        node = cfg
        for part in key.split("."):
            if not isinstance(node, CfgNode) or part not in node:
                raise ConfigError(f"{source}: unknown config key '{key}'")
            node = node[part]


#: Keys that hold one of a few words, where YAML's and the command line's True and False stand
#: for "true" and "false" (yacs refuses a bool for a text key).
CHOICE_KEYS = {"ENGINE.COMPILE": ("auto", "true", "false")}


def _choice(key: str, value, source: str) -> str:
    """``value`` of choice key ``key`` as one of its words; :class:`ConfigError` for anything else."""
    word = str(value).lower()
    if word not in CHOICE_KEYS[key]:
        raise ConfigError(f"{source}: {key} is {value!r}, not one of {', '.join(CHOICE_KEYS[key])}")
    return word


def _choices_as_text(loaded: dict, source: str) -> dict:
    """A config file's contents (nested dicts) with its choice keys as words."""
    for key in CHOICE_KEYS:
        *parents, leaf = key.split(".")
        node = loaded
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            node[leaf] = _choice(key, node[leaf], source)
    return loaded


@contextmanager
def _naming(config_file: str):
    """fvcore's and yacs's complaints about a config file, as a :class:`ConfigError` naming it."""
    try:
        yield
    except ConfigError:
        raise
    except KeyError as err:  # fvcore: "Non-existent config key: X"
        raise ConfigError(f"{config_file}: {err.args[0]}") from None
    except (ValueError, TypeError, AssertionError) as err:  # yacs: a value of the wrong type
        raise ConfigError(f"{config_file}: {err}; fix the value in the file") from None


def load_config(config_file: str | None = None, overrides: Iterable[str] = ()) -> CfgNode:
    """Defaults, then ``config_file`` (with its ``_BASE_`` chain), then ``KEY VALUE`` overrides.

    Returns a frozen config whose values are in range (:mod:`pretrain.config_checks`). Errors
    name the file or override that is at fault, or the key, its value and the allowed range.
    """
    cfg = get_default_config()
    if config_file is not None:
        if not os.path.isfile(config_file):
            raise ConfigError(f"{config_file}: config file not found")
        with _naming(config_file):
            loaded = cfg.load_yaml_with_base(config_file)
        loaded = _choices_as_text(loaded, config_file)  # our code, outside: its bugs are not the file's
        with _naming(config_file):
            cfg.merge_from_other_cfg(CfgNode(loaded))
    overrides = list(overrides)
    if len(overrides) % 2:
        raise ConfigError(f"overrides must be KEY VALUE pairs, got an odd list: {overrides}")
    _check_keys(cfg, overrides, "command line")
    overrides = [item for key, value in zip(overrides[0::2], overrides[1::2])
                 for item in (key, _choice(key, value, "command line") if key in CHOICE_KEYS else value)]
    try:
        cfg.merge_from_list(overrides)
    except (ValueError, TypeError, AssertionError) as err:  # yacs: "Type mismatch ... for config key: K"
        raise ConfigError(f"command line: {err}; give a value of the key's type") from None
    from pretrain.config_checks import check_config_values  # imports this module

    check_config_values(cfg, " with ".join(filter(None, [config_file and str(config_file), overrides and "the command line"])) or "config")
    cfg.freeze()
    return cfg


def flatten_config(node: CfgNode, prefix: str = "") -> dict:
    """``{"SECTION.KEY": value}`` of a config, tuples as lists (as YAML reads them back)."""
    flat = {}
    for key, value in node.items():
        if isinstance(value, CfgNode):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:  # YAML has no tuples: compare (1, 2) from an override equal to a saved [1, 2]
            flat[f"{prefix}{key}"] = _as_lists(value)
    return flat


def _as_lists(value):
    """``value`` with its tuples, nested ones included, as lists."""
    return [_as_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


#: Keys whose value is a local file or folder: one spelt relative to the working directory and
#: its absolute spelling name the same data.
PATH_KEYS = frozenset({"DATA.ROOT", "DATA.TOKENIZER_MODEL"})

#: ENGINE keys that change how a run is executed and recorded, not what it learns (compiled and
#: channels-last steps equal the eager ones within rounding): two runs that differ only in these
#: follow the same recipe.
EXECUTION_ONLY_KEYS = frozenset({
    "ENGINE.CHECKPOINT_PERIOD", "ENGINE.KEEP_LAST_CHECKPOINTS", "ENGINE.PINNED_CHECKPOINTS", "ENGINE.LOG_PERIOD",
    "ENGINE.VAL_PERIOD", "ENGINE.VAL_CAPTION_METRICS", "ENGINE.CHANNELS_LAST", "ENGINE.COMPILE",
    "ENGINE.COMPILE_MIN_ITERATIONS",
})


def config_differences(saved: str, current: CfgNode, ignore: frozenset = frozenset()) -> list[str]:
    """``KEY: saved -> current`` for every key but those in ``ignore`` whose value differs between
    a run's saved config (the YAML text a checkpoint stores) and ``current``; a key only one of
    them has is listed with ``(absent)`` on the other side. Empty when the two describe the same run.

    A key added to the defaults after the run was saved is not a difference while ``current``
    keeps its default, which is how the code behaved before the key existed; so a new option
    does not make every earlier run look like another recipe. Paths (``PATH_KEYS``) are compared
    as the files they name from the working directory, so ``datasets/coco`` and its absolute
    spelling are the same data.

    Used before reusing or resuming a run, so that a changed config is reported instead of
    being mixed silently into results made with another one.
    """
    before, after = flatten_config(CfgNode.load_cfg(saved)), flatten_config(current)
    defaults = flatten_config(get_default_config())
    absent = "(absent)"

    def same(key: str) -> bool:
        old, new = before.get(key, defaults.get(key, absent)), after.get(key, absent)
        if key in PATH_KEYS and isinstance(old, str) and isinstance(new, str):
            return os.path.realpath(old) == os.path.realpath(new)
        return old == new

    return [
        f"{key}: {before.get(key, absent)} -> {after.get(key, absent)}"
        for key in sorted((before.keys() | after.keys()) - ignore)
        if not same(key)
    ]
