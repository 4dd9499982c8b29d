"""The demo's bar for a side-by-side fine-tuning follows detectron2's metrics.json."""
import json

from virtex_d2.pipeline.demo import _iterations_done


def test_iterations_done_reads_the_last_logged_iteration(tmp_path):
    assert _iterations_done(tmp_path) == 0, "nothing logged yet"
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"iteration": 19, "total_loss": 2.0}) + "\n" + json.dumps({"iteration": 39}) + "\n")
    assert _iterations_done(tmp_path) == 40
    metrics.write_text(json.dumps({"iteration": 19}) + "\n" + '{"iterat')  # caught mid-write
    assert _iterations_done(tmp_path) == 20
