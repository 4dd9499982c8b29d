"""The report's caption-evaluation input: a missing, damaged or foreign file is named in one line."""
import json

import pytest

from pretrain.errors import BadValueError, MissingInputError
from virtex_d2.reports.pretraining import read_caption_eval


def test_caption_evaluation_file_problems_are_named(tmp_path):
    missing = tmp_path / "none.json"
    with pytest.raises(MissingInputError, match=f"{missing}: caption evaluation not found"):
        read_caption_eval(missing)
    damaged = tmp_path / "cut.json"
    damaged.write_text('{"scores": {"CIDEr-D": 0.2')
    with pytest.raises(BadValueError, match=f"{damaged}: not a JSON file"):
        read_caption_eval(damaged)
    foreign = tmp_path / "captions.json"
    foreign.write_text(json.dumps([{"image": "a.jpg", "caption": "a dog"}]))  # tools/caption.py's output instead
    with pytest.raises(BadValueError, match="expected tools/eval_captioning.py's output"):
        read_caption_eval(foreign)
    good = tmp_path / "eval.json"
    good.write_text(json.dumps({"scores": {"CIDEr-D": 0.2}, "class_naming": None}))
    assert read_caption_eval(good)["scores"] == {"CIDEr-D": 0.2}
