"""The demo's time estimate: reference costs scaled by this machine's probe and the run's size."""
import pytest

from virtex_d2.pipeline.estimate import (
    REFERENCE,
    StageCosts,
    estimate_seconds,
    probe_seconds,
)

COSTS = StageCosts("test machine", probe_s=0.5, fixed_s=30.0, pretrain_s_per_iter=0.2, labels_s_per_iter=0.1,
                   finetune_pair_s_per_iter=1.0)


def test_the_estimate_scales_with_iterations_initialisations_and_the_probe():
    base = estimate_seconds(600, 600, ("virtex", "random"), 0.5, COSTS)
    assert base == pytest.approx(30 + 0.2 * 600 + 1.0 * 600)
    assert estimate_seconds(600, 600, ("virtex", "random"), 1.0, COSTS) == pytest.approx(2 * base)  # a machine half as fast
    # The labels control adds its pretraining and, with four rows, a second pair of fine-tunings.
    four = estimate_seconds(600, 600, ("virtex", "random", "labels", "default"), 0.5, COSTS)
    assert four == pytest.approx(base + 0.1 * 600 + 1.0 * 600)


def test_the_reference_is_measured_and_the_probe_runs():
    assert REFERENCE.probe_s > 0 and REFERENCE.finetune_pair_s_per_iter > 0
    assert 0 < probe_seconds(image_size=32, batch_size=2, steps=1) < 60
