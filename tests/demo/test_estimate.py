"""The demo's time estimate: reference costs scaled by this machine's probe and the run's size."""
import pytest

from virtex_d2.pipeline.estimate import (
    REFERENCE,
    StageCosts,
    estimate_seconds,
    probe_seconds,
)

COSTS = StageCosts("test machine", probe_s=0.5, fixed_s={"dataset": 20.0, "report": 10.0}, pretrain_s_per_iter=0.2,
                   labels_s_per_iter=0.1, finetune_pair_s_per_iter=1.0)
FULL_DEMO = {"dataset", "pretrain", "finetune_lvis_virtex", "finetune_lvis_random", "report"}


def test_the_estimate_scales_with_iterations_initialisations_and_the_probe():
    base = estimate_seconds(FULL_DEMO, 600, 600, 0.5, COSTS)
    assert base == pytest.approx(30 + 0.2 * 600 + 1.0 * 600)
    assert estimate_seconds(FULL_DEMO, 600, 600, 1.0, COSTS) == pytest.approx(2 * base)  # a machine half as fast
    # The labels control adds its pretraining and, with four rows, a second pair of fine-tunings.
    four = FULL_DEMO | {"pretrain_labels", "finetune_lvis_labels", "finetune_lvis_default"}
    assert estimate_seconds(four, 600, 600, 0.5, COSTS) == pytest.approx(base + 0.1 * 600 + 1.0 * 600)


def test_only_the_stages_still_to_run_are_counted():
    # Adding the labels row to a finished demo: its pretraining, one fine-tuning and the report.
    added = {"pretrain_labels", "finetune_lvis_labels", "report"}
    assert estimate_seconds(added, 600, 600, 0.5, COSTS) == pytest.approx(10 + 0.1 * 600 + 1.0 * 600)
    assert estimate_seconds(set(), 600, 600, 0.5, COSTS) == 0


def test_the_reference_is_measured_and_the_probe_runs():
    assert REFERENCE.probe_s > 0 and REFERENCE.finetune_pair_s_per_iter > 0
    assert 0 < probe_seconds(image_size=32, batch_size=2, steps=1) < 60
