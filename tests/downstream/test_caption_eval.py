"""tools/eval_captioning.py on the built-in val split, and the optional Java metrics."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from pretrain.caption_metrics import caption_metrics, load_references
from pretrain.downstream import caption_eval
from pretrain.downstream.class_words import evaluate_class_naming
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
    words = result["word_grounding"]
    assert words and set(words[0]) == {"word", "count", "loss_matched_images", "loss_shuffled_images", "gap"}
    assert words[0]["gap"] == pytest.approx(words[0]["loss_shuffled_images"] - words[0]["loss_matched_images"])
    out = capsys.readouterr().out
    assert "CIDEr-D: " in out and f"\n{words[0]['word']:<16}{words[0]['count']:>7}" in out
    # The class words are checked against the split's instances, as class_words counts them.
    naming = result["class_naming"]
    expected = evaluate_class_naming(captions, synthetic_root / "coco" / "annotations" / "instances_val2017.json")
    assert naming == json.loads(json.dumps(expected))
    assert (result["scores"]["class_names_present"], result["scores"]["class_names_absent"]) == (
        expected["names_present"], expected["names_absent"])
    assert "precision" in out and "recall" in out
    assert tool.main(argv) == 2  # no silent overwrite


def test_max_images_scores_the_first_images_of_the_training_split(tiny_config, tiny_checkpoint, synthetic_root, tmp_path):
    """What a decoder is chosen on: the first N training images, not the val images it is reported on."""
    output = tmp_path / "train.json"
    argv = ["--config", str(tiny_config), "--checkpoint", str(tiny_checkpoint), "--output", str(output),
            "--num-workers", "0", "--split", "train", "--max-images", "5"]
    assert load_tool("eval_captioning").main(argv) == 0
    result = json.loads(output.read_text())
    train_ids = sorted(load_references(synthetic_root / "coco" / "annotations" / "captions_train2017.json"))
    assert [c["image_id"] for c in result["captions"]] == train_ids[:5]
    assert result["class_naming"]["images"] == 5


def test_captions_without_an_instances_file_say_that_class_words_are_not_checked(
        tiny_config, tiny_checkpoint, synthetic_root, tmp_path, capsys):
    root = tmp_path / "coco"
    shutil.copytree(synthetic_root / "coco" / "val2017", root / "val2017")
    (root / "annotations").mkdir()
    shutil.copy(synthetic_root / "coco" / "annotations" / "captions_val2017.json", root / "annotations")
    output = tmp_path / "captions.json"
    argv = ["--config", str(tiny_config), "--checkpoint", str(tiny_checkpoint), "--output", str(output),
            "--num-workers", "0", "--max-images", "2", "--opts", "DATA.ROOT", str(root)]
    assert load_tool("eval_captioning").main(argv) == 0
    instances = root / "annotations" / "instances_val2017.json"
    assert f"class words: not checked ({instances} not found;" in capsys.readouterr().out
    assert json.loads(output.read_text())["class_naming"] is None


def test_a_negative_number_of_words_is_refused(capsys):
    with pytest.raises(SystemExit):
        load_tool("eval_captioning").main(["--config", "c.yaml", "--checkpoint", "c.pth", "--words", "-1"])
    assert "--words must be 0 or more, got -1" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "1"], ("--batch-size must be 2 or more (the grounding gap pairs each caption with another "
                             "image of its batch), got 1")),
    (["--max-images", "1"], "--max-images must be 2 or more (the grounding gap pairs images), got 1"),
    (["--num-workers", "-1"], "--num-workers must be 0 or more, got -1"),
])
def test_flags_out_of_range_are_refused_before_anything_is_decoded(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        load_tool("eval_captioning").main(["--config", "c.yaml", "--checkpoint", "c.pth", *flags])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_missing_java_metrics_are_unavailable_not_zero(monkeypatch):
    monkeypatch.setattr(caption_eval.shutil, "which", lambda name: None)
    scores = caption_eval.score_captions({1: "a red car"}, {1: ["a red car", "a car"]})
    assert scores["METEOR"] == scores["SPICE"] == "unavailable: needs Java (no 'java' on PATH)"
    assert scores["CIDEr-D"] == pytest.approx(caption_metrics({1: "a red car"}, {1: ["a red car", "a car"]})["CIDEr-D"])


def test_checkpoint_of_another_model_and_empty_split_are_named(tiny_config, tiny_checkpoint, synthetic_root, tmp_path, capsys):
    tool = load_tool("eval_captioning")
    base = ["--config", str(tiny_config), "--checkpoint", str(tiny_checkpoint), "--num-workers", "0", "--opts"]
    assert tool.main(base + ["MODEL.TEXTUAL.NAME", "transdec_postnorm::L1_H64_A2_F64"]) == 2
    assert f"{tiny_checkpoint}: does not fit the model" in capsys.readouterr().err

    root = tmp_path / "coco"
    (root / "val2017").mkdir(parents=True)
    shutil.copytree(synthetic_root / "coco" / "annotations", root / "annotations")
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps({"images": [], "annotations": []}))
    assert tool.main(base + ["DATA.ROOT", str(root)]) == 2
    assert "captions_val2017.json: no usable images" in capsys.readouterr().err


def _val_model_and_data(tiny_config):
    from pretrain.config import load_config
    from pretrain.tasks import build_dataset, build_model
    from pretrain.tokenizer import SentencePieceBPETokenizer

    cfg = load_config(str(tiny_config))
    dataset = build_dataset(cfg, "val", SentencePieceBPETokenizer(cfg.DATA.TOKENIZER_MODEL))
    torch.manual_seed(0)
    return build_model(cfg), dataset


def _blind(model):
    with torch.no_grad():  # every image becomes the same (zero) decoder memory
        model.textual.visual_projection.weight.zero_()
        model.textual.visual_projection.bias.zero_()
    return model


def test_grounding_gap_is_zero_for_a_model_blind_to_the_image(tiny_config):
    model, dataset = _val_model_and_data(tiny_config)
    gap = caption_eval.grounding_gap(_blind(model), dataset, batch_size=4, num_workers=0)
    assert gap["grounding_gap"] == pytest.approx(0.0, abs=1e-6)
    assert gap["loss_matched_images"] > 0


def test_a_last_batch_of_one_image_joins_the_gap_of_the_batch_before(tiny_config):
    """4 images in batches of 3: the 4th joins the first batch, so both gaps score the same
    single batch of all 4 (it used to be left out: a batch of one has no other image)."""
    model, dataset = _val_model_and_data(tiny_config)
    assert len(dataset) == 4
    assert caption_eval.comparison_batches(7, 3) == [[0, 1, 2], [3, 4, 5, 6]]
    assert caption_eval.comparison_batches(6, 3) == [[0, 1, 2], [3, 4, 5]]
    gaps = []
    for batch_size in (3, 4):
        torch.manual_seed(0)  # the same caption drawn for each image
        gaps.append(caption_eval.grounding_gap(model, dataset, batch_size=batch_size, num_workers=0))
    assert gaps[0] == pytest.approx(gaps[1], rel=1e-6)
    with pytest.raises(ValueError, match="needs batches of at least 2 images"):
        caption_eval.grounding_gap(model, dataset, batch_size=1, num_workers=0)


def _word_grounding(model, dataset, first_word_index, seed=0):
    torch.manual_seed(seed)  # the dataset draws one of each image's captions from torch's RNG
    return caption_eval.word_grounding(model, dataset, dataset.tokenizer.id_to_token, first_word_index,
                                       batch_size=len(dataset), num_workers=0)


def test_word_losses_add_up_to_the_forward_loss(tiny_config):
    """With every token counted (first_word_index 0: [EOS] joins the word before it), the word
    losses times their counts are the forward head's summed CE, with own and rotated images."""
    from torch.utils.data import DataLoader

    from pretrain.data import collate_fn

    model, dataset = _val_model_and_data(tiny_config)
    words = _word_grounding(model.eval(), dataset, first_word_index=0)
    torch.manual_seed(0)  # the same captions as word_grounding's DataLoader drew
    batch = next(iter(DataLoader(dataset, batch_size=len(dataset), collate_fn=collate_fn)))
    targets = int((batch["caption_tokens"][:, 1:] != 0).sum())
    with torch.no_grad():
        own = model(batch)["loss_components"]["captioning_forward"]
        other = model({**batch, "image": batch["image"].roll(1, 0)})["loss_components"]["captioning_forward"]
    assert sum(w.count * w.loss_matched_images for w in words) == pytest.approx(float(own) * targets, rel=1e-5)
    assert sum(w.count * w.loss_shuffled_images for w in words) == pytest.approx(float(other) * targets, rel=1e-5)
    assert [w.count for w in words] == sorted((w.count for w in words), reverse=True)


def test_word_gaps_are_zero_for_a_blind_model_and_words_are_whole(tiny_config):
    model, dataset = _val_model_and_data(tiny_config)
    words = _word_grounding(_blind(model), dataset, first_word_index=4)
    assert words and all(w.gap == pytest.approx(0.0, abs=1e-5) for w in words)
    assert all(w.word and not w.word.startswith("\u2581") and "[" not in w.word for w in words)
    assert {"left", "right"} & {w.word for w in words}  # whole words of the built-in captions
    assert "," in {w.word for w in words} and not [w.word for w in words if w.word[-1] in ",." and len(w.word) > 1]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grounding_gap_grows_when_captions_depend_on_their_images(tiny_config, seed):
    """A model that memorised each image's caption scores it better with its own image. Each
    image keeps one of its captions, so that the captions scored are the ones memorised: which
    of ~5 the dataset draws depends on the global RNG, hence on the CPU's kernels and the
    DataLoader's seeding, and an unseen caption says nothing about grounding."""
    from dataclasses import replace

    from pretrain.data import collate_fn

    model, dataset = _val_model_and_data(tiny_config)
    dataset._records = [replace(record, captions=record.captions[seed : seed + 1]) for record in dataset._records]
    torch.manual_seed(seed)
    batch = collate_fn([dataset[i] for i in range(len(dataset))])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):  # memorise the val captions of these few images
        optimizer.zero_grad()
        model(batch)["loss"].backward()
        optimizer.step()
    gap = caption_eval.grounding_gap(model, dataset, batch_size=len(dataset), num_workers=0)
    assert gap["grounding_gap"] > 0.05, gap  # a blind model scores 0 (test above)
    words = _word_grounding(model, dataset, first_word_index=4, seed=seed)
    assert max(w.gap for w in words) > 0.5, words[:5]  # some words now come from the image
