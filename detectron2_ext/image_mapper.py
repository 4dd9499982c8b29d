"""detectron2's ``DatasetMapper`` with unreadable images reported as bad input.

detectron2 decodes each image when a batch is built, so a truncated or non-image file in a
dataset of thousands surfaces mid-run as a PIL ``OSError`` traceback from inside a DataLoader
worker (the dataset checks read image headers only, to stay fast). This mapper turns it into a
:class:`~pretrain.data.images.BadImageError` naming the file, which the tools print as one line.
"""
from __future__ import annotations

from detectron2.data import DatasetMapper

from pretrain.data.images import BadImageError
from pretrain.errors import is_machine_fault


class ImageNamingMapper(DatasetMapper):
    """A ``DatasetMapper`` whose image read errors name the file and what to do."""

    def __call__(self, dataset_dict: dict) -> dict:
        try:
            return super().__call__(dataset_dict)
        except OSError as err:  # PIL's "image file is truncated", "cannot identify image file", a missing file
            if is_machine_fault(err):
                raise
            raise BadImageError(f"{dataset_dict.get('file_name')}: cannot read image ({err}); replace the file or "
                                "remove its entry from the dataset") from None
