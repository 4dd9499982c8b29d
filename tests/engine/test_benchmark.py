"""tools/benchmark.py: the pretrain and decoder modes run end to end and write what docs/benchmarks.md quotes."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.engine.conftest import REPO, TINY_CONFIG, subprocess_env

BENCHMARK = REPO / "tools" / "benchmark.py"


def run_benchmark(tmp_path, *args: str) -> dict:
    out = tmp_path / "result.json"
    result = subprocess.run(
        [sys.executable, str(BENCHMARK), *args, "--config", str(TINY_CONFIG), "--iters", "2", "--warmup", "1",
         "--json", str(out), "DATA.MAX_CAPTION_LENGTH", "30"],
        env=subprocess_env(), capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_pretrain_mode_reports_step_time_throughput_and_memory(tmp_path):
    result = run_benchmark(tmp_path, "pretrain", "--batch-size", "2", "--image-size", "64")
    assert len(result["step_s_all"]) == 2
    assert 0 < result["step_s_min"] <= result["step_s_median"]
    assert abs(result["images_per_s"] - 2 / result["step_s_median"]) < 1e-9
    assert 0.1 < result["peak_rss_gib"] < 20
    assert result["allocator"] in ("tcmalloc", "glibc-tuned")  # the launcher re-executed itself
    assert result["precision"] in ("float32", "bfloat16") and result["channels_last"]


def test_decoder_mode_times_padded_and_packed_paths(tmp_path):
    result = run_benchmark(tmp_path, "decoder", "--batch-size", "4")
    assert len(result["padded_s_all"]) == len(result["packed_s_all"]) == 2
    assert result["speedup"] == result["padded_s_median"] / result["packed_s_median"]
    # Captions of 20..30 tokens padded to the longest: some, not all, positions are real.
    assert 0.5 < result["real_token_fraction"] < 1.0
