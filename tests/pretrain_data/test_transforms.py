"""Caption-aware transforms: every official name, the left/right swap, shapes, seeding."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.config import load_config
from pretrain.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TRANSFORMS,
    HorizontalFlipWithCaption,
    build_transform,
    make_transform,
    swap_left_right,
)


def random_image(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def to_array(image) -> np.ndarray:
    return np.asarray(image) if isinstance(image, Image.Image) else image.permute(1, 2, 0).numpy()


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("a dog on the left of a cat", "a dog on the right of a cat"),
        ("Left hand, RIGHT foot, left-right", "Right hand, LEFT foot, right-left"),
        ("a bright room, leftover pizza, upright lamp, copyright", "a bright room, leftover pizza, upright lamp, copyright"),
        ("the man's right, the dog's left.", "the man's left, the dog's right."),
    ],
)
def test_left_right_swap_is_on_whole_words(caption, expected):
    assert swap_left_right(caption) == expected
    assert swap_left_right(expected) == caption


def test_flip_mirrors_pixels_and_swaps_the_caption():
    image = random_image()
    flipped, caption = HorizontalFlipWithCaption(p=1.0)(image, "a bright cat on the left")
    assert caption == "a bright cat on the right"
    np.testing.assert_array_equal(to_array(flipped), to_array(image)[:, ::-1])
    same, caption = HorizontalFlipWithCaption(p=0.0)(image, "on the left")
    assert caption == "on the left" and same is image


def test_flip_happens_about_half_the_time():
    torch.manual_seed(0)
    flip = TRANSFORMS["horizontal_flip"](32)
    swaps = sum(flip(random_image(8, 8), "left")[1] == "right" for _ in range(400))
    assert 160 < swaps < 240  # p = 0.5; 4.5 standard deviations either side


def test_train_pipeline_output_and_caption():
    transform = make_transform(["random_resized_crop", "horizontal_flip", "color_jitter", "normalize"], 32)
    torch.manual_seed(0)
    captions = set()
    for _ in range(20):
        image, caption = transform(random_image(), "a dog on the left")
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and type(image) is torch.Tensor
        captions.add(caption)
    assert captions == {"a dog on the left", "a dog on the right"}


def test_random_resized_crop_keeps_content_at_full_scale():
    # A uniform image stays uniform whatever the crop; a non-square input becomes square.
    image = Image.new("RGB", (80, 40), (10, 200, 30))
    out, caption = TRANSFORMS["random_resized_crop"](24)(image, "x")
    assert out.size == (24, 24) and caption == "x"
    assert np.all(np.asarray(out) == (10, 200, 30))


def test_color_jitter_changes_colours_but_not_geometry():
    torch.manual_seed(0)
    jitter = TRANSFORMS["color_jitter"](32)
    image = random_image(16, 16)
    outputs = [to_array(jitter(image, "c")[0]) for _ in range(200)]
    assert all(out.shape == (16, 16, 3) for out in outputs)
    changed = sum(not np.array_equal(out, np.asarray(image)) for out in outputs)
    assert 140 < changed < 180  # applied with p = 0.8; 3.5 standard deviations either side


def test_normalize_uses_imagenet_statistics():
    mean_colour = tuple(round(255 * m) for m in IMAGENET_MEAN)
    out, _ = TRANSFORMS["normalize"](32)(Image.new("RGB", (4, 4), mean_colour), "c")
    assert out.dtype == torch.float32 and out.shape == (3, 4, 4)
    assert out.abs().max() < 0.01
    white, _ = TRANSFORMS["normalize"](32)(Image.new("RGB", (2, 2), (255, 255, 255)), "c")
    expected = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    torch.testing.assert_close(white[:, 0, 0], torch.tensor(expected), atol=1e-5, rtol=0)


def test_val_pipeline_resizes_the_short_side_then_centre_crops():
    cfg = load_config(overrides=["DATA.IMAGE_CROP_SIZE", "20"])
    transform = build_transform(cfg, "val")
    # Left half black, right half white: the centre crop of the resized image keeps both halves.
    image = Image.new("RGB", (60, 30), (0, 0, 0))
    image.paste((255, 255, 255), (30, 0, 60, 30))
    out, caption = transform(image, "on the left")
    assert out.shape == (3, 20, 20) and caption == "on the left"
    assert out[:, :, :8].mean() < -1.5 and out[:, :, 12:].mean() > 1.5
    torch.testing.assert_close(transform(image, "c")[0], out)  # deterministic
    small, _ = make_transform(["smallest_resize"], 20)(Image.new("RGB", (60, 30)), "c")
    assert small.shape == (3, 20, 40)
    square, _ = make_transform(["global_resize"], 20)(Image.new("RGB", (60, 30)), "c")
    assert square.shape == (3, 20, 20)


def test_without_normalize_the_image_is_scaled_to_unit_range():
    out, _ = make_transform(["center_crop"], 8)(Image.new("RGB", (10, 10), (255, 0, 51)), "c")
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([1.0, 0.0, 0.2]))


def test_same_seed_same_augmentation():
    transform = make_transform(["random_resized_crop", "horizontal_flip", "color_jitter", "normalize"], 16)
    image = random_image()
    torch.manual_seed(3)
    first = [transform(image, "left")[0] for _ in range(3)]
    torch.manual_seed(3)
    second = [transform(image, "left")[0] for _ in range(3)]
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)
    assert not torch.equal(first[0], first[1])


def test_unknown_transform_names_are_errors():
    with pytest.raises(ValueError, match=r"DATA.IMAGE_TRANSFORM_TRAIN: unknown image transform\(s\) \['random_blur'\]"):
        build_transform(load_config(overrides=["DATA.IMAGE_TRANSFORM_TRAIN", "['normalize', 'random_blur']"]), "train")
    with pytest.raises(ValueError, match="split must be"):
        build_transform(load_config(), "test")


def test_caption_tools_see_the_official_evaluation_input_by_default():
    """Official eval_captioning.py: shorter side 256, then the central 224 crop (the val
    transform resizes to 224 and would see more of the image)."""
    from torchvision.transforms.v2 import functional as TF

    from pretrain.downstream.caption_eval import caption_eval_config

    cfg = load_config()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    evaluated, _ = build_transform(caption_eval_config(cfg), "val")(image, "")
    expected = TF.pil_to_tensor(TF.center_crop(TF.resize(image, 256), 224))
    expected = TF.normalize(TF.to_dtype(expected, torch.float32, scale=True), IMAGENET_MEAN, IMAGENET_STD)
    assert evaluated.shape == (3, 224, 224)
    torch.testing.assert_close(evaluated, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(build_transform(cfg, "val")(image, "")[0], evaluated, atol=1e-3)
