"""Turn scene objects into COCO-style instance annotations (polygons, box, area).

Masks, boxes and areas are all derived from the same polygons through pycocotools, so they
agree exactly with what pycocotools, lvis and detectron2 decode from the files.
"""
from __future__ import annotations

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from .scenes import SceneObject


def mask_to_polygons(mask: np.ndarray) -> list[list[float]]:
    """Outer contours of a hole-free mask as COCO polygons ``[x1, y1, x2, y2, ...]``.

    Contour points sit on pixel centres, hence the half-pixel shift into COCO's continuous
    coordinates. Specks too thin to form a polygon (fewer than 3 points) are left out.
    """
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        points = contour.reshape(-1, 2).astype(np.float64) + 0.5
        if len(points) >= 3:
            polygons.append([round(float(v), 2) for v in points.reshape(-1)])
    return polygons


def polygon_geometry(polygons: list[list[float]], height: int, width: int) -> tuple[float, list[float]]:
    """Area (pixels) and XYWH box of the region that ``polygons`` cover, as pycocotools sees it."""
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    return float(mask_utils.area(rle)), [float(v) for v in mask_utils.toBbox(rle)]


def object_annotation(obj: SceneObject, height: int, width: int) -> dict | None:
    """``segmentation``, ``area`` and ``bbox`` of what ``obj`` shows, or None if nothing is left."""
    polygons = mask_to_polygons(obj.mask)
    if not polygons:
        return None
    area, bbox = polygon_geometry(polygons, height, width)
    if area <= 0:
        return None
    return {"segmentation": polygons, "area": area, "bbox": bbox}
