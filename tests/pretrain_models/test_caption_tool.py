"""tools/caption.py end to end: tiny vocabulary, official-format checkpoint, a folder of images."""
import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from pretrain.config import load_config
from pretrain.data.images import load_rgb_image
from pretrain.data.transforms import build_transform
from pretrain.tasks import build_model
from pretrain.tokenizer import SentencePieceBPETokenizer, train_vocabulary
from tests.tool_main import Tool

TOOL = Path(__file__).resolve().parents[2] / "tools" / "caption.py"
UNK, EOS = 0, 2
WORDS = ["a", "man", "dog", "cat", "sitting", "on", "the", "red", "blue", "bench", "table", "with", "two", "people", "near", "street", "grass"]


def load_tool() -> Tool:
    return Tool(TOOL.stem)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Vocabulary, config, official-format checkpoint and three images in a temporary folder."""
    root = tmp_path_factory.mktemp("caption")
    rng = random.Random(0)
    captions = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) for _ in range(300)]
    vocab = train_vocabulary(captions, root / "vocab", vocab_size=60)
    size = SentencePieceBPETokenizer(vocab).get_vocab_size()
    config = root / "tiny.yaml"
    config.write_text(
        f"""MODEL:
  NAME: virtex
  VISUAL: {{NAME: "torchvision::resnet18", FEATURE_SIZE: 512}}
  TEXTUAL: {{NAME: "transdec_postnorm::L1_H32_A2_F64"}}
  DECODER: {{BEAM_SIZE: 2, MAX_DECODING_STEPS: 6}}
DATA:
  TOKENIZER_MODEL: "{vocab}"
  VOCAB_SIZE: {size}
  MAX_CAPTION_LENGTH: 12
  IMAGE_CROP_SIZE: 64
"""
    )
    cfg = load_config(str(config))
    torch.manual_seed(0)
    model = build_model(cfg)
    checkpoint = root / "checkpoint_10.pth"
    torch.save({"model": model.state_dict(), "optimizer": {}, "scheduler": {}, "scaler": {}, "iteration": 10},
               checkpoint)
    images = root / "images"
    images.mkdir()
    for i, (w, h) in enumerate([(80, 64), (64, 100), (90, 90)]):
        Image.new("RGB", (w, h), (40 * i, 200 - 50 * i, 90)).save(images / f"img{i}.{'png' if i else 'jpg'}")
    (images / "notes.txt").write_text("not an image")
    return {"root": root, "config": config, "checkpoint": checkpoint, "images": images, "cfg": cfg}


def test_captions_a_folder_like_the_model_does(setup, caplog, capsys):
    output = setup["root"] / "out" / "captions.json"
    args = ["--config", str(setup["config"]), "--checkpoint", str(setup["checkpoint"]),
            "--images", str(setup["images"]), "--output", str(output), "--batch-size", "2", "--device", "cpu"]
    assert load_tool().main(args) == 0
    results = json.loads(output.read_text())
    assert [r["image"] for r in results] == ["img0.jpg", "img1.png", "img2.png"]
    assert f"{setup['images']}: left out 1 file not named as an image (notes.txt)" in caplog.text
    assert "captioning: 100%" in capsys.readouterr().err  # a progress bar over the images: minutes on a CPU

    cfg = setup["cfg"]
    model = build_model(cfg)
    model.load_state_dict(torch.load(setup["checkpoint"], weights_only=True)["model"])
    model.eval()
    transform = build_transform(cfg, "val")
    tokenizer = SentencePieceBPETokenizer(cfg.DATA.TOKENIZER_MODEL)
    images = torch.stack([transform(load_rgb_image(setup["images"] / r["image"]), "")[0] for r in results])
    with torch.no_grad():
        predictions = model({"image": images})["predictions"]
    # The default decoder is the official beam search, whose rows are read as the official script does.
    assert [r["caption"] for r in results] == [tokenizer.decode_official(p.tolist()) for p in predictions]

    # An existing output is not overwritten without --force.
    assert load_tool().main(args) == 2
    assert load_tool().main(args + ["--force"]) == 0


def test_a_generated_unk_is_written_as_the_official_code_writes_it(setup):
    """Output biases that make <unk> the favourite and [EOS] the runner-up: greedy official
    decoding writes <unk>, then [EOS] (the previous token is penalised); the caption is
    SentencePiece's " \u2047 ", as the official script writes it. Our rules ban <unk>: empty."""
    state = torch.load(setup["checkpoint"], weights_only=True)
    bias = state["model"]["textual.output.bias"]
    bias[UNK], bias[EOS] = 20.0, 19.0
    checkpoint = setup["root"] / "unk_first.pth"
    torch.save(state, checkpoint)
    captions = {}
    for name in ("beam_search", "beam_search_ours"):
        output = setup["root"] / f"{name}.json"
        argv = ["--config", str(setup["config"]), "--checkpoint", str(checkpoint), "--images", str(setup["images"]),
                "--output", str(output), "--device", "cpu",
                "--opts", "MODEL.DECODER.BEAM_SIZE", "1", "MODEL.DECODER.NAME", name]
        assert load_tool().main(argv) == 0
        captions[name] = [r["caption"] for r in json.loads(output.read_text())]
    assert captions == {"beam_search": [" \u2047 "] * 3, "beam_search_ours": [""] * 3}


def test_errors_name_the_bad_input(setup, capsys):
    bad = setup["root"] / "bad.pth"
    bad.write_bytes(b"\x00" * 100)
    base = ["--config", str(setup["config"]), "--output", str(setup["root"] / "never.json")]
    assert load_tool().main(base + ["--checkpoint", str(bad), "--images", str(setup["images"])]) == 2
    assert "bad.pth: not a PyTorch checkpoint" in capsys.readouterr().err
    empty = setup["root"] / "empty"
    empty.mkdir()
    assert load_tool().main(base + ["--checkpoint", str(setup["checkpoint"]), "--images", str(empty)]) == 2
    assert "empty: no image files" in capsys.readouterr().err
    assert not (setup["root"] / "never.json").exists()


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "0"], "--batch-size must be 1 or more, got 0"),
    (["--device", "gpu"], "--device gpu is not a torch device (use cpu, cuda or cuda:N)"),
])
def test_flags_out_of_range_are_refused_in_one_line(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_:
        load_tool().main(["--config", "c.yaml", "--checkpoint", "c.pth", "--images", ".", *flags])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f": error: {message}")


@pytest.mark.parametrize("cuda_devices, device, message", [
    (0, "cuda", "--device cuda: this machine has no CUDA device (use --device cpu, or leave --device out)"),
    (1, "cuda:3", "--device cuda:3: this machine has 1 CUDA device (cuda:0 to cuda:0)"),
])
def test_a_cuda_device_this_machine_lacks_is_refused_in_one_line(monkeypatch, capsys, cuda_devices, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_devices > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_devices)
    with pytest.raises(SystemExit) as exit_:
        load_tool().main(["--config", "c.yaml", "--checkpoint", "c.pth", "--images", ".", "--device", device])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f": error: {message}")
