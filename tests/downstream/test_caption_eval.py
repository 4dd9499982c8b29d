"""tools/eval_captioning.py on the built-in val split, and the optional Java metrics."""
from __future__ import annotations

import json
import shutil

import pytest

from pretrain.downstream import caption_eval
from pretrain.engine.validation import caption_metrics, load_references
from tests.downstream.conftest import load_tool


def test_eval_captioning_decodes_the_val_split_and_scores_it(tiny_config, tiny_checkpoint, synthetic_root, tmp_path, capsys):
    output = tmp_path / "captions.json"
    tool = load_tool("eval_captioning")
    argv = ["--config", str(tiny_config), "--checkpoint", str(tiny_checkpoint), "--output", str(output), "--num-workers", "0"]
    assert tool.main(argv) == 0
    result = json.loads(output.read_text())
    references = load_references(synthetic_root / "coco" / "annotations" / "captions_val2017.json")
    assert [c["image_id"] for c in result["captions"]] == sorted(references)
    captions = {c["image_id"]: c["caption"] for c in result["captions"]}
    assert all(captions.values()), "beam search produced an empty caption"
    # The reported CIDEr-D/BLEU-4 are the pretraining validation metric of these captions.
    assert {k: result["scores"][k] for k in ("CIDEr-D", "BLEU-4")} == pytest.approx(caption_metrics(captions, references))
    for name, unavailable in (("METEOR", caption_eval.meteor_unavailable()), ("SPICE", caption_eval.spice_unavailable())):
        if unavailable is None:
            assert isinstance(result["scores"][name], float) and 0.0 <= result["scores"][name] <= 1.0
        else:
            assert result["scores"][name] == f"unavailable: {unavailable}"
    assert "CIDEr-D: " in capsys.readouterr().out
    assert tool.main(argv) == 1  # no silent overwrite


def test_missing_java_metrics_are_unavailable_not_zero(monkeypatch):
    monkeypatch.setattr(caption_eval.shutil, "which", lambda name: None)
    scores = caption_eval.score_captions({1: "a red car"}, {1: ["a red car", "a car"]})
    assert scores["METEOR"] == scores["SPICE"] == "unavailable: needs Java (no 'java' on PATH)"
    assert scores["CIDEr-D"] == pytest.approx(caption_metrics({1: "a red car"}, {1: ["a red car", "a car"]})["CIDEr-D"])


def test_checkpoint_of_another_model_and_empty_split_are_named(tiny_config, tiny_checkpoint, synthetic_root, tmp_path, capsys):
    tool = load_tool("eval_captioning")
    base = ["--config", str(tiny_config), "--checkpoint", str(tiny_checkpoint), "--num-workers", "0", "--opts"]
    assert tool.main(base + ["MODEL.TEXTUAL.NAME", "transdec_postnorm::L1_H64_A2_F64"]) == 1
    assert f"{tiny_checkpoint}: does not fit the model" in capsys.readouterr().err

    root = tmp_path / "coco"
    (root / "val2017").mkdir(parents=True)
    shutil.copytree(synthetic_root / "coco" / "annotations", root / "annotations")
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps({"images": [], "annotations": []}))
    assert tool.main(base + ["DATA.ROOT", str(root)]) == 1
    assert "captions_val2017.json: no usable images" in capsys.readouterr().err
