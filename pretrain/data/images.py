"""Reading image files as RGB, with errors that name the file."""
from __future__ import annotations

import os
from typing import BinaryIO

from PIL import Image

from pretrain.errors import InputError


class BadImageError(InputError, OSError):
    """An image file that is missing, truncated or not an image."""


def load_rgb_image(path: str | os.PathLike | BinaryIO, name: str | None = None) -> Image.Image:
    """Decode ``path`` (a file name, or an open binary file named ``name`` in errors, such as a
    tar member's bytes) fully and return it as an RGB PIL image.

    Greyscale, CMYK and palette files are converted to RGB; an alpha channel is
    dropped (as OpenCV's ``imread``, which the official code uses, does). Raises
    :class:`BadImageError` naming the file when it is missing or cannot be decoded, so a
    corrupt file surfaces here and not as an obscure error inside a transform.
    """
    name = name or path
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode == "RGB":
                return image
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")  # PIL's route for palettes with a transparent index
            return image.convert("RGB")
    except FileNotFoundError:
        raise BadImageError(f"{name}: image file not found") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise BadImageError(f"{name}: cannot read image ({err})") from None
