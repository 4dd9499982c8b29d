"""tools/benchmark.py: the pretrain, decoder and finetune modes run end to end and write what docs/benchmarks.md quotes."""
from __future__ import annotations

import json
import math
import subprocess
import sys

from tests.engine.conftest import REPO, TINY_CONFIG, subprocess_env

BENCHMARK = REPO / "tools" / "benchmark.py"


def run_benchmark(tmp_path, *args: str, config=TINY_CONFIG, overrides=("DATA.MAX_CAPTION_LENGTH", "30")) -> dict:
    out = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, str(BENCHMARK), *args, "--config", str(config), "--iters", "2", "--warmup", "1",
         "--json", str(out), *overrides],
        env=subprocess_env(), capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def assert_step_times(result: dict, batch_size: int) -> None:
    assert len(result["step_s_all"]) == 2
    assert 0 < result["step_s_min"] <= result["step_s_median"]
    assert abs(result["images_per_s"] - batch_size / result["step_s_median"]) < 1e-9
    assert 0.1 < result["peak_rss_gib"] < 20
    assert result["allocator"] in ("tcmalloc", "glibc-tuned")  # the launcher re-executed itself


def test_pretrain_mode_reports_step_time_throughput_and_memory(tmp_path):
    result = run_benchmark(tmp_path, "pretrain", "--batch-size", "2", "--image-size", "64")
    assert_step_times(result, batch_size=2)
    assert result["precision"] in ("float32", "bfloat16") and result["channels_last"]
    # The tiny config's 8 iterations would not repay a compilation: auto leaves the step eager.
    assert not result["compile"] and "8 iterations left, fewer than" in result["compile_reason"]
    # The official step at its best is timed in the same run, and the speed-up is the ratio of medians.
    official = result["official_best"]
    assert len(official["step_s_all"]) == 2 and official["precision"] in ("float32", "bfloat16")
    assert result["speedup_vs_official_best"] == official["step_s_median"] / result["step_s_median"]
    # The share of the matmul limit: the step's counted FLOPs over its time, against a measured matmul.
    assert result["tflop_per_step"] > 0 and result["matmul_peak_tflops"] > 0
    assert math.isclose(result["matmul_share"], result["tflop_per_step"] / result["step_s_median"]
                        / result["matmul_peak_tflops"])


def test_pretrain_mode_compiles_as_the_config_says_unless_the_flag_does(tmp_path):
    result = run_benchmark(tmp_path, "pretrain", "--batch-size", "2", "--image-size", "64", "--no-official",
                           overrides=("DATA.MAX_CAPTION_LENGTH", "30", "ENGINE.COMPILE", "false"))
    assert not result["compile"] and result["compile_reason"] == "ENGINE.COMPILE False"


def test_pretrain_mode_compiled_reports_the_compilation_time(tmp_path):
    result = run_benchmark(tmp_path, "pretrain", "--batch-size", "2", "--image-size", "64", "--compile",
                           "--no-official")
    assert result["compile"] and result["compile_reason"] == "ENGINE.COMPILE True"
    assert result["compiled_at_the_end"] and result["compile_s"] > 0 and "official_best" not in result


def test_pretrain_mode_runs_the_precision_the_config_trains_in(tmp_path):
    """``--precision auto`` is the config's AMP / AMP_DTYPE, so a config that trains in fp32 (the
    demo's) is timed in fp32 and one that asks for bf16 in bf16, whatever this CPU has."""
    for amp, amp_dtype, expected in (("False", "auto", "float32"), ("True", "bf16", "bfloat16")):
        result = run_benchmark(tmp_path, "pretrain", "--batch-size", "2", "--image-size", "64",
                               overrides=("DATA.MAX_CAPTION_LENGTH", "30", "AMP", amp, "AMP_DTYPE", amp_dtype))
        assert result["precision"] == expected, (amp, amp_dtype)


def test_decoder_mode_times_padded_and_packed_paths(tmp_path):
    result = run_benchmark(tmp_path, "decoder", "--batch-size", "4")
    assert len(result["padded_s_all"]) == len(result["packed_s_all"]) == 2
    assert result["speedup"] == result["padded_s_median"] / result["packed_s_median"]
    # Captions of 20..30 tokens padded to the longest: some, not all, positions are real.
    assert 0.5 < result["real_token_fraction"] < 1.0


def test_finetune_mode_times_the_demo_transfer_config(tmp_path, synthetic_root):
    """Steps of the demo's Mask R-CNN config on the built-in LVIS split (at 128 px to stay short)."""
    config = REPO / "configs" / "detectron2" / "builtin" / "lvis_segm_R_18_FPN_builtin.yaml"
    result = run_benchmark(tmp_path, "finetune", "--threads", "1", config=config,
                           overrides=("INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "192"))
    assert_step_times(result, batch_size=2)
    assert result["mode"] == "finetune" and result["device"] == "cpu" and result["threads"] == 1
    # A Mask R-CNN loss at initialisation: the five detectron2 losses, 1203-way classification among them.
    assert math.isfinite(result["first_loss"]) and result["first_loss"] > 1


def test_vitdet_steps_are_timed_with_the_vitdet_recipe(tmp_path, synthetic_root):
    """The demo's ViTDet config, with its AdamW and LSJ loader, AMP asked for and off on CPU
    (ViT pretraining configs go through the pretrain mode like any other)."""
    vitdet = REPO / "configs" / "detectron2" / "builtin" / "lvis_segm_ViTDet_T_builtin.yaml"
    result = run_benchmark(tmp_path, "finetune", "--threads", "1", config=vitdet, overrides=(
        "MODEL.VIT.IMG_SIZE", "128", "MODEL.SFP.SQUARE_PAD", "128", "INPUT.LSJ.IMAGE_SIZE", "128",
        "INPUT.MAX_SIZE_TEST", "128", "MODEL.VIT.WINDOW_SIZE", "4", "SOLVER.AMP.ENABLED", "True"))
    assert_step_times(result, batch_size=2)
    assert math.isfinite(result["first_loss"]) and result["first_loss"] > 1
    assert result["recipe"] == ["train loader: large-scale jitter, 0.1-2 of 128x128",
                                "optimizer: AdamW (ViTDet recipe), layer-wise lr decay 0.7 over 12 ViT blocks"]
