"""Object proposals for Fast R-CNN: selective search, its on-disk cache, proposal files.

Fast R-CNN scores about 2000 selective-search proposals per image ("fast" mode of Uijlings et
al. 2013). They are computed once per image with OpenCV's contrib module
(`cv2.ximgproc.segmentation`, PyPI package `opencv-contrib-python-headless`) and cached, one
file per image. The proposals of the Fast R-CNN release (or any other method) can be read
instead.

Every proposal here is an int32 box (x1, y1, x2, y2) in the devkit's 1-based inclusive pixel
coordinates of the original image, like the ground truth of `data.voc`.

Sources, each with `get(image_id) -> [P, 4]`:
- `ProposalCache(directory)`: `<directory>/<image_id>.npy`, written by `compute_proposals`;
- `load_proposal_file(path)`: a directory in that layout; a `.npz` holding one [P, 4] array
  (x1, y1, x2, y2, 1-based) per image id; or a `.mat` of the Fast R-CNN release
  (`selective_search_data/voc_2007_*.mat`: `images` ids and `boxes` cells of 1-based
  (y1, x1, y2, x2) rows).

This module imports neither TensorFlow nor OpenCV at import time: worker processes start
fast, and the rest of the zoo works without OpenCV.
"""

from __future__ import annotations

import io
import multiprocessing
import os
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from scipy import io as scipy_io

from runtime.errors import InvalidInput
from runtime.progress import Progress

OPENCV_PACKAGE = "opencv-contrib-python-headless==5.0.0.93"
MODES = ("fast", "quality", "single")
MAKE_PROPOSALS_HINT = ("make them with `python -m evaluation.voc.detection --only_proposals "
                       "--proposal_cache=DIR` (selective search) or pass --proposals=FILE")


class ProposalError(InvalidInput):
    """Proposals that are missing, empty or malformed (one-line message)."""


def _cv2():
    try:
        import cv2  # optional: OpenCV's contrib modules, for selective search only
    except ImportError:
        raise ProposalError(f"selective search needs OpenCV's contrib modules: pip install "
                            f"{OPENCV_PACKAGE}") from None
    if not hasattr(cv2, "ximgproc"):
        raise ProposalError(f"the installed OpenCV lacks the contrib module ximgproc: pip "
                            f"install {OPENCV_PACKAGE} (and uninstall opencv-python)")
    return cv2


def selective_search(image: np.ndarray, mode: str = "fast", max_proposals: int = 2000,
                     min_size: int = 1) -> np.ndarray:
    """Selective-search boxes of one image.

    Args:
      image: [H, W, 3] uint8 RGB.
      mode: "fast" (Fast R-CNN's setting), "quality" or "single" (one strategy).
      max_proposals: keep at most this many, in OpenCV's ranking (0: all).
      min_size: drop boxes narrower or shorter than this many pixels.

    Returns:
      [P, 4] int32 unique boxes (x1, y1, x2, y2), 1-based inclusive, in OpenCV's order. The
      set of all boxes is a function of the image, but their ranking draws random numbers
      (Uijlings et al. 2013, Sec. 3.3), so the order, and the set kept by max_proposals,
      can vary between calls: the cache fixes them once per image.
    """
    if mode not in MODES:
        raise ProposalError(f"unknown selective search mode {mode!r}; choose one of "
                            f"{', '.join(MODES)}")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ProposalError(f"selective search needs an [H, W, 3] image; got {image.shape}")
    cv2 = _cv2()
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(np.ascontiguousarray(image[..., ::-1].astype(np.uint8)))  # BGR
    {"fast": search.switchToSelectiveSearchFast,
     "quality": search.switchToSelectiveSearchQuality,
     "single": search.switchToSingleStrategy}[mode]()
    rects = np.asarray(search.process(), dtype=np.int64).reshape(-1, 4)  # 0-based x, y, w, h
    rects = rects[(rects[:, 2] >= min_size) & (rects[:, 3] >= min_size)]
    boxes = np.stack([rects[:, 0] + 1, rects[:, 1] + 1, rects[:, 0] + rects[:, 2],
                      rects[:, 1] + rects[:, 3]], axis=1)
    _, first = np.unique(boxes, axis=0, return_index=True)
    boxes = boxes[np.sort(first)]
    if max_proposals:
        boxes = boxes[:max_proposals]
    return boxes.astype(np.int32)


def _check(boxes, image_id: str, source: str) -> np.ndarray:
    boxes = np.asarray(boxes)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ProposalError(f"proposals of image {image_id} in {source} must be [P, 4]; got "
                            f"shape {boxes.shape}")
    if boxes.shape[0] == 0:
        raise ProposalError(f"image {image_id} has no proposal in {source}: a detector cannot "
                            "score it; recompute its proposals or drop the image")
    return boxes.astype(np.int32)


class ProposalCache:
    """Per-image proposal files `<directory>/<image_id>.npy` ([P, 4] int32)."""

    def __init__(self, directory: str):
        self.directory = os.fspath(directory)

    def path(self, image_id: str) -> str:
        return os.path.join(self.directory, f"{image_id}.npy")

    def __contains__(self, image_id: str) -> bool:
        return os.path.exists(self.path(image_id))

    def get(self, image_id: str) -> np.ndarray:
        """The proposals of `image_id`; ProposalError if absent or empty."""
        if image_id not in self:
            raise ProposalError(f"no proposals for image {image_id} in {self.directory}: "
                                f"{MAKE_PROPOSALS_HINT}")
        return _check(np.load(self.path(image_id)), image_id, self.directory)

    def put(self, image_id: str, boxes: np.ndarray) -> None:
        """Write atomically (a reader never sees half a file)."""
        os.makedirs(self.directory, exist_ok=True)
        tmp = self.path(image_id) + f".tmp{os.getpid()}.npy"
        np.save(tmp, np.asarray(boxes, dtype=np.int32).reshape(-1, 4))
        os.replace(tmp, self.path(image_id))

    def __repr__(self) -> str:
        return f"ProposalCache({self.directory!r})"


class ProposalTable:
    """Proposals held in memory: {image_id: [P, 4]} read from `source`."""

    def __init__(self, table: Mapping[str, np.ndarray], source: str):
        self.table = dict(table)
        self.source = source

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.table

    def get(self, image_id: str) -> np.ndarray:
        if image_id not in self.table:
            raise ProposalError(f"no proposals for image {image_id} in {self.source}: "
                                f"{MAKE_PROPOSALS_HINT}")
        return _check(self.table[image_id], image_id, self.source)


def _mat_text(value) -> str:
    value = np.asarray(value).reshape(-1)
    return "".join(str(v) for v in value) if value.dtype.kind == "U" else str(value[0])


def load_proposal_file(path: str) -> ProposalCache | ProposalTable:
    """A proposal source from a directory of .npy files, a .npz or a Fast R-CNN .mat file.

    Raises ProposalError (one line) when the path does not exist or has another format.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return ProposalCache(path)
    if not os.path.exists(path):
        raise ProposalError(f"proposal file {path} does not exist: {MAKE_PROPOSALS_HINT}")
    if path.endswith(".npz"):
        with np.load(path) as data:
            return ProposalTable({key: data[key] for key in data.files}, path)
    if path.endswith(".mat"):
        data = scipy_io.loadmat(path)
        if "boxes" not in data or "images" not in data:
            raise ProposalError(f"proposal file {path} lacks the `boxes` and `images` fields "
                                "of a Fast R-CNN selective-search file")
        images = [_mat_text(v) for v in np.asarray(data["images"]).reshape(-1)]
        boxes = [np.asarray(b).reshape(-1, 4)[:, (1, 0, 3, 2)]
                 for b in np.asarray(data["boxes"]).reshape(-1)]
        if len(images) != len(boxes):
            raise ProposalError(f"proposal file {path} has {len(images)} images but "
                                f"{len(boxes)} box arrays")
        return ProposalTable(dict(zip(images, boxes, strict=True)), path)
    raise ProposalError(f"proposal file {path}: expected a directory, a .npz or a .mat file")


def _search_one(args: tuple[str, np.ndarray, str, int]) -> tuple[str, np.ndarray]:
    image_id, image, mode, max_proposals = args
    cv2 = _cv2()
    cv2.setNumThreads(1)  # the pool supplies the parallelism
    return image_id, selective_search(image, mode, max_proposals)


def _search_all(pending, pool, search_fn) -> list[tuple[str, np.ndarray]]:
    """[(image_id, boxes)] of the pending (image_id, image, mode, max_proposals) tuples."""
    if pool is not None:
        return pool.map(_search_one, pending)
    if search_fn is not None:
        return [(i, search_fn(image)) for i, image, _, _ in pending]
    return [_search_one(args) for args in pending]


def compute_proposals(images: Iterable[tuple[str, np.ndarray]], cache: ProposalCache,
                      workers: int = 0, mode: str = "fast", max_proposals: int = 2000,
                      progress: bool = True, total: int | None = None,
                      search_fn: Callable[[np.ndarray], np.ndarray] | None = None,
                      chunk: int = 16) -> dict[str, int]:
    """Fill `cache` with the proposals of every image it does not hold yet.

    Args:
      images: (image_id, [H, W, 3] uint8 RGB) pairs.
      cache: where proposals are read and written.
      workers: processes running selective search (0: in this process).
      mode, max_proposals: `selective_search` settings.
      progress: show progress over the images (runtime/progress.py).
      total: the number of images, for the progress bar.
      search_fn: image -> boxes, instead of selective search (in-process only).
      chunk: images handed to the workers at a time (bounds the memory held).

    Returns:
      {"computed": images searched now, "cached": images already in the cache}.
    """
    if search_fn is not None and workers:
        raise ValueError("a custom search_fn runs in-process only (workers=0)")
    counts = {"computed": 0, "cached": 0}
    bar = Progress(total, "selective search", unit=" images",
                   stream=None if progress else io.StringIO())
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers else None
    finished = False
    try:
        pending: list[tuple[str, np.ndarray, str, int]] = []

        def flush():
            for image_id, boxes in _search_all(pending, pool, search_fn):
                cache.put(image_id, boxes)
            counts["computed"] += len(pending)
            bar.update(counts["computed"] + counts["cached"], cached=counts["cached"])
            pending.clear()

        for image_id, image in images:
            if image_id in cache:
                counts["cached"] += 1
                bar.update(counts["computed"] + counts["cached"], cached=counts["cached"])
                continue
            pending.append((image_id, np.asarray(image), mode, max_proposals))
            if len(pending) >= max(chunk, workers):
                flush()
        if pending:
            flush()
        finished = True
    finally:
        bar.close()
        if pool is not None:
            # On an error (or Ctrl-C) the workers are stopped rather than awaited.
            if finished:
                pool.close()
            else:
                pool.terminate()
            pool.join()
    return counts
