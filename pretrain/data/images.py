"""Reading image files as RGB, with errors that name the file."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from pretrain.errors import InputError, MissingInputError, is_machine_fault

logger = logging.getLogger(__name__)

#: What the folder-reading tools take for an image (PIL reads each; a GIF gives its first frame).
IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class BadImageError(InputError, OSError):
    """An image file that is missing, truncated or not an image."""


def load_rgb_image(path: str | os.PathLike | BinaryIO, name: str | None = None) -> Image.Image:
    """Decode ``path`` (a file name, or an open binary file named ``name`` in errors, such as a
    tar member's bytes) fully and return it as an RGB PIL image.

    Read as OpenCV's ``imread``, which the official code uses, reads it: turned upright by its
    EXIF orientation (a phone photo stored sideways), an alpha channel dropped, 16-bit greyscale
    scaled to 8 bits (its high byte; a plain conversion would clip it to white), greyscale, CMYK
    and palette files converted to RGB. Raises :class:`BadImageError` naming the file when it is
    missing or cannot be decoded, so a corrupt file surfaces here and not as an obscure error
    inside a transform.
    """
    name = name or path
    try:  # the file's part: its errors are the file's, unless the machine failed
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
    except FileNotFoundError:
        raise BadImageError(f"{name}: image file not found") from None
    except OSError as err:
        if is_machine_fault(err):
            raise
        raise BadImageError(f"{name}: cannot read image ({err})") from None
    except (ValueError, Image.DecompressionBombError) as err:
        raise BadImageError(f"{name}: cannot read image ({err})") from None
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        image = Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL's route for palettes with a transparent index
    return image.convert("RGB")


def is_hidden(name: str) -> bool:
    """Whether a file or folder name is hidden (starts with a dot): macOS's ``._IMG_0001.JPG``
    (the metadata of a photo copied to a shared or FAT drive, named like the photo but no image),
    ``.DS_Store``, Jupyter's ``.ipynb_checkpoints``. Folder readers leave them out, counted."""
    return name.startswith(".")


def _not_an_image(path: Path) -> str | None:
    """Why :func:`list_image_files` leaves ``path`` out (a key of its warning), or None for an image."""
    if path.is_dir():
        return "subfolder"
    if not path.is_file():  # a broken link, a FIFO: it would stop the run when opened
        return "not a regular file"
    if is_hidden(path.name):
        return "hidden file"
    return None if path.suffix.lower() in IMAGE_SUFFIXES else "file not named as an image"


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files directly inside ``folder`` (by suffix, sorted by name). Hidden files
    (:func:`is_hidden`), other files and subfolders (the folder is not read recursively) are left
    out with one log line counting and naming them, so that a folder of mixed files does not look
    fully read and a hidden ``._photo.jpg`` does not stop the run; errors name the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a folder; give the folder that holds it" if folder.exists() else "image folder not found"
        raise MissingInputError(f"{folder}: {what}")
    images: list[Path] = []
    left_out: dict[str, list[str]] = {"hidden file": [], "file not named as an image": [], "not a regular file": [],
                                      "subfolder": []}
    for path in sorted(folder.iterdir()):
        kind = _not_an_image(path)
        if kind is None:
            images.append(path)
        else:
            left_out[kind].append(path.name)
    if not images:
        raise MissingInputError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    parts = [f"{len(names)} {kind}{'s' if len(names) > 1 else ''} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
             for kind, names in left_out.items() if names]
    if parts:
        logger.warning("%s: left out %s; the files read are those directly in it ending in %s", folder,
                       ", ".join(parts), ", ".join(IMAGE_SUFFIXES))
    return images
