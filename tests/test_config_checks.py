"""Config values are checked before any data or model is built: each bad value ends with one line
naming the key, the value and the allowed range (pretrain.config_checks for pretraining configs,
detectron2_ext.config for the detectron2 keys the project adds or relies on)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.config import ConfigError, get_default_config, load_config
from pretrain.config_checks import (
    CLASSIFICATION_LOSSES,
    DECODERS,
    OPTIMIZERS,
    check_world_size,
)

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/builtin/bicaptioning_R_18_L1_H256.yaml"
D2_CONFIG = "configs/detectron2/cpu/voc_det_default_init_cpu.yaml"

# (overrides, what the one line must say): the key, the value and the allowed range
BAD_VALUES = [
    (["OPTIM.BATCH_SIZE", "-1"], "OPTIM.BATCH_SIZE is -1; must be an integer >= 1"),
    (["OPTIM.BATCH_SIZE", "15", "ENGINE.GRAD_ACCUM_STEPS", "2"],
     "OPTIM.BATCH_SIZE is 15; must be divisible by ENGINE.GRAD_ACCUM_STEPS (2)"),
    (["ENGINE.GRAD_ACCUM_STEPS", "0"], "ENGINE.GRAD_ACCUM_STEPS is 0; must be an integer >= 1"),
    (["DATA.IMAGE_CROP_SIZE", "0"], "DATA.IMAGE_CROP_SIZE is 0; must be an integer >= 1"),
    (["OPTIM.LR", "-0.001"], "OPTIM.LR is -0.001; must be a number in [0, inf)"),
    (["OPTIM.CNN_LR", "-1.0"], "OPTIM.CNN_LR is -1.0; must be a number in [0, inf)"),
    (["OPTIM.WARMUP_STEPS", "601"], "OPTIM.WARMUP_STEPS is 601; must be <= OPTIM.NUM_ITERATIONS (600)"),
    (["OPTIM.NUM_ITERATIONS", "0"], "OPTIM.NUM_ITERATIONS is 0; must be an integer >= 1"),
    (["MODEL.DECODER.BEAM_SIZE", "0"], "MODEL.DECODER.BEAM_SIZE is 0; must be an integer >= 1"),
    (["MODEL.CLASSIFICATION_LOSS", "hinge"],
     "MODEL.CLASSIFICATION_LOSS is 'hinge'; must be one of k_hot_softmax, binary_cross_entropy"),
    (["MODEL.DECODER.NAME", "greedy"], "MODEL.DECODER.NAME is 'greedy'; must be one of beam_search, "),
    (["MODEL.DECODER.MAX_DECODING_STEPS", "40"],
     "MODEL.DECODER.MAX_DECODING_STEPS is 40; must be <= DATA.MAX_CAPTION_LENGTH (30)"),
    (["DATA.MAX_CAPTION_LENGTH", "2", "MODEL.DECODER.MAX_DECODING_STEPS", "2"],
     "DATA.MAX_CAPTION_LENGTH is 2; must be an integer >= 3"),
    (["DATA.NUM_WORKERS", "-1"], "DATA.NUM_WORKERS is -1; must be an integer >= 0"),
    (["ENGINE.CHECKPOINT_PERIOD", "0"], "ENGINE.CHECKPOINT_PERIOD is 0; must be an integer >= 1"),
    (["ENGINE.VAL_PERIOD", "-5"], "ENGINE.VAL_PERIOD is -5; must be an integer >= 0"),
    (["ENGINE.COMPILE_MIN_ITERATIONS", "-1"], "ENGINE.COMPILE_MIN_ITERATIONS is -1; must be an integer >= 0"),
    (["DATA.OPEN_SHARDS", "0"], "DATA.OPEN_SHARDS is 0; must be an integer >= 1"),
    (["DATA.SHARD_RETRIES", "-1"], "DATA.SHARD_RETRIES is -1; must be an integer >= 0"),
    (["DATA.MAX_BAD_SHARD_FRACTION", "1.5"], "DATA.MAX_BAD_SHARD_FRACTION is 1.5; must be a number in [0, 1]"),
    (["OPTIM.LR_DECAY_NAME", "exp"], "OPTIM.LR_DECAY_NAME is 'exp'; must be one of none, linear, cosine, multistep"),
    (["OPTIM.OPTIMIZER_NAME", "adam"], "OPTIM.OPTIMIZER_NAME is 'adam'; must be one of sgd, adamw"),
    (["MODEL.VISUAL.NAME", "torchvision::resnet7"], "MODEL.VISUAL.NAME 'torchvision::resnet7' is not supported"),
    (["MODEL.TEXTUAL.NAME", "transdec_postnorm::L1_H256"], "MODEL.TEXTUAL.NAME 'transdec_postnorm::L1_H256' is not of"),
    # a centre crop larger than the resize before it: torchvision pads the rest with black
    (["DATA.IMAGE_CROP_SIZE", "288", "DATA.IMAGE_TRANSFORM_CAPTION_EVAL", "['smallest_resize@256','center_crop','normalize']"],
     ("DATA.IMAGE_TRANSFORM_CAPTION_EVAL is ['smallest_resize@256', 'center_crop', 'normalize']: center_crop (288 px) "
     "crops an image resized to 256 px: the rest is black borders")),
    # a ViT takes only multiples of its patch size (timm asserted mid-run)
    (["MODEL.VISUAL.NAME", "timm::vit_tiny_patch16_224", "DATA.IMAGE_CROP_SIZE", "100"],
     ("DATA.IMAGE_TRANSFORM_TRAIN is ['global_resize', 'horizontal_flip', 'normalize']: 100 px images, but "
     "timm::vit_tiny_patch16_224 needs a multiple of its patch size 16")),
    (["MODEL.VISUAL.NAME", "timm::vit_tiny_patch16_224", "DATA.IMAGE_TRANSFORM_CAPTION_EVAL", "['smallest_resize','normalize']"],
     ("DATA.IMAGE_TRANSFORM_CAPTION_EVAL is ['smallest_resize', 'normalize']: images of varying size, but "
     "timm::vit_tiny_patch16_224 needs a multiple of its patch size 16")),
]


@pytest.mark.parametrize("overrides, expected", BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_a_bad_value_names_key_value_and_range(overrides, expected):
    with pytest.raises(ConfigError, match="^" + CONFIG) as caught:
        load_config(CONFIG, overrides)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_every_bad_value_is_listed_at_once():
    with pytest.raises(ConfigError) as caught:
        load_config(CONFIG, ["OPTIM.BATCH_SIZE", "0", "OPTIM.LR", "-1.0", "DATA.NUM_WORKERS", "-2"])
    assert all(key in str(caught.value) for key in ("OPTIM.BATCH_SIZE", "OPTIM.LR", "DATA.NUM_WORKERS"))


def test_a_fault_of_our_own_while_reading_a_config_file_is_not_blamed_on_the_file(monkeypatch):
    """Only fvcore's and yacs's complaints about the file become a ConfigError naming it."""
    import pretrain.config as config_module

    def broken(loaded, source):
        raise KeyError("ENGINE")  # as a bug in the choice-key conversion would
    monkeypatch.setattr(config_module, "_choices_as_text", broken)
    with pytest.raises(KeyError) as caught:
        load_config(CONFIG)
    assert not isinstance(caught.value, ConfigError)


def test_every_shipped_config_passes():
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        if "detectron2" not in path.parts:
            load_config(str(path))


def test_the_world_size_must_divide_the_batch():
    cfg = load_config(CONFIG, ["OPTIM.BATCH_SIZE", "16", "ENGINE.GRAD_ACCUM_STEPS", "2"])
    check_world_size(cfg, 4)
    with pytest.raises(ConfigError, match=r"OPTIM.BATCH_SIZE is 16; must be divisible by 3 rank\(s\) x "
                                          r"ENGINE.GRAD_ACCUM_STEPS 2 = 6"):
        check_world_size(cfg, 3)


def test_the_checked_names_are_the_builders_names():
    from pretrain.engine.optim import build_optimizer
    from pretrain.models import classification
    from pretrain.models.factory import build_decoder

    assert CLASSIFICATION_LOSSES == tuple(classification.CLASSIFICATION_LOSSES)
    for name in DECODERS:
        cfg = get_default_config()
        cfg.MODEL.DECODER.NAME = name
        build_decoder(cfg)
    for name in OPTIMIZERS:
        cfg = get_default_config()
        cfg.OPTIM.OPTIMIZER_NAME = name
        cfg.OPTIM.LOOKAHEAD.USE = False
        build_optimizer(cfg, torch.nn.Linear(2, 2))
    unknown = get_default_config()
    unknown.MODEL.DECODER.NAME = "greedy"
    with pytest.raises(ValueError, match="greedy"):
        build_decoder(unknown)


def run(tool: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / tool), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize("key, value", [
    ("OPTIM.BATCH_SIZE", "-1"),  # was "collate_fn got an empty list of samples"
    ("DATA.IMAGE_CROP_SIZE", "0"),  # was "height and width must be > 0"
    ("OPTIM.LR", "-0.1"),  # was torch's "Invalid learning rate"
    ("MODEL.DECODER.BEAM_SIZE", "0"),  # was a message naming no key
    ("MODEL.VISUAL.NAME", "torchvision::resnet7"),  # was a traceback once the data were checked
])
def test_pretrain_refuses_a_bad_value_before_reading_any_data(tmp_path, key, value):
    """DATA.ROOT and the tokenizer do not exist: had anything been read, the error would name them."""
    output = tmp_path / "run"
    result = run("pretrain.py", "--config", CONFIG, "--output-dir", output, "DATA.ROOT", tmp_path / "no_data",
                 "DATA.TOKENIZER_MODEL", tmp_path / "no.model", key, value)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pretrain: error: ") and key in lines[0] and value in lines[0], lines
    assert not output.exists()


def test_detectron2_values_are_checked_when_loaded():
    from detectron2_ext import load_config as load_d2_config

    load_d2_config(D2_CONFIG)
    with pytest.raises(ConfigError, match="VIRTEX.CPU_SYNC_NORM is 'SyncBN'; must be one of naiveSyncBN"):
        load_d2_config(D2_CONFIG, ["VIRTEX.CPU_SYNC_NORM", "SyncBN"])
    with pytest.raises(ConfigError) as caught:
        load_d2_config(D2_CONFIG, ["SOLVER.IMS_PER_BATCH", "0", "SOLVER.BASE_LR", "-0.1", "TEST.EVAL_PERIOD", "-1"])
    for expected in ("SOLVER.IMS_PER_BATCH is 0; must be an integer >= 1", "SOLVER.BASE_LR is -0.1; must be a number >= 0",
                     "TEST.EVAL_PERIOD is -1"):
        assert expected in str(caught.value)


@pytest.mark.parametrize("args, expected", [
    (["VIRTEX.CPU_SYNC_NORM", "SyncBN"], "VIRTEX.CPU_SYNC_NORM is 'SyncBN'"),
    (["--num-gpus", "2", "SOLVER.IMS_PER_BATCH", "3"],
     "SOLVER.IMS_PER_BATCH is 3; must be divisible by the 2 training processes"),
])
def test_train_net_refuses_a_bad_value_in_one_line(tmp_path, args, expected):
    result = run("train_net.py", "--config-file", D2_CONFIG, *args, "OUTPUT_DIR", tmp_path / "run")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("train_net: error: ") and expected in last, last
    assert not (tmp_path / "run").exists()
