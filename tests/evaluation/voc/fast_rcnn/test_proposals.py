"""Proposals: selective search, the on-disk cache, proposal files and their errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from scipy import io as scipy_io

from evaluation.voc.fast_rcnn import boxes as box_ops
from evaluation.voc.fast_rcnn import proposals as props
from tests.helpers import shape_image


def images(n: int, seed: int = 0) -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image, boxes, _ = shape_image(rng, (96, 120), num_objects=1)
        out.append((f"{i:06d}", image, boxes))
    return out


def test_selective_search_finds_the_object():
    for _, image, gt in images(2):
        boxes = props.selective_search(image, "fast", max_proposals=300)
        assert boxes.dtype == np.int32 and 0 < len(boxes) <= 300
        assert len(np.unique(boxes, axis=0)) == len(boxes)
        # 1-based inclusive boxes inside the image.
        assert np.all(boxes[:, :2] >= 1) and np.all(boxes[:, 2] <= 120)
        assert np.all(boxes[:, 3] <= 96) and np.all(boxes[:, 2:] >= boxes[:, :2])
        assert box_ops.iou_matrix(boxes, gt).max() >= 0.7


def test_cache_second_run_reads_it(tmp_path):
    data = images(3)
    calls = []

    def search(image):
        calls.append(image.shape)
        return np.array([[1, 1, 5, 5], [2, 2, 9, 9]]) + len(calls)

    cache = props.ProposalCache(str(tmp_path / "cache"))
    first = props.compute_proposals(((i, im) for i, im, _ in data), cache, search_fn=search,
                                    progress=False)
    assert first == {"computed": 3, "cached": 0} and len(calls) == 3
    stored = {i: cache.get(i) for i, _, _ in data}
    np.testing.assert_array_equal(stored["000001"], [[3, 3, 7, 7], [4, 4, 11, 11]])
    second = props.compute_proposals(((i, im) for i, im, _ in data), cache, search_fn=search,
                                     progress=False)
    assert second == {"computed": 0, "cached": 3} and len(calls) == 3
    for image_id, boxes in stored.items():
        np.testing.assert_array_equal(cache.get(image_id), boxes)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "000000.npy", "000001.npy", "000002.npy"]


def test_parallel_workers_match_in_process(tmp_path):
    data = images(3, seed=1)
    parallel = props.ProposalCache(str(tmp_path / "parallel"))
    counts = props.compute_proposals(((i, im) for i, im, _ in data), parallel, workers=2,
                                     max_proposals=0, progress=False, chunk=2)
    assert counts == {"computed": 3, "cached": 0}
    for image_id, image, _ in data:
        # The same boxes (their ranking is random: compare them sorted).
        np.testing.assert_array_equal(
            np.unique(parallel.get(image_id), axis=0),
            np.unique(props.selective_search(image, "fast", max_proposals=0), axis=0))


def test_proposal_files(tmp_path):
    boxes = {"000005": np.array([[1, 2, 30, 40], [5, 6, 7, 8]]), "000007": np.array([[3, 3, 9, 9]])}
    np.savez(tmp_path / "p.npz", **boxes)
    table = props.load_proposal_file(str(tmp_path / "p.npz"))
    np.testing.assert_array_equal(table.get("000005"), boxes["000005"])
    # The Fast R-CNN release: `images` ids and `boxes` cells of (y1, x1, y2, x2) rows.
    cells = np.empty((1, 2), dtype=object)
    cells[0, 0] = boxes["000005"][:, (1, 0, 3, 2)].astype(np.float64)
    cells[0, 1] = boxes["000007"][:, (1, 0, 3, 2)].astype(np.float64)
    ids = np.empty((2, 1), dtype=object)
    ids[0, 0], ids[1, 0] = "000005", "000007"
    scipy_io.savemat(tmp_path / "voc_2007_test.mat", {"boxes": cells, "images": ids})
    mat = props.load_proposal_file(str(tmp_path / "voc_2007_test.mat"))
    for image_id, expected in boxes.items():
        np.testing.assert_array_equal(mat.get(image_id), expected)
    # A directory in the cache layout.
    props.ProposalCache(str(tmp_path / "dir")).put("000009", boxes["000007"])
    folder = props.load_proposal_file(str(tmp_path / "dir"))
    np.testing.assert_array_equal(folder.get("000009"), boxes["000007"])


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_errors_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(props.ProposalError) as caught:
        props.load_proposal_file(str(tmp_path / "missing.npz"))
    assert "missing.npz does not exist" in one_line(caught)
    assert "--only_proposals" in one_line(caught)  # how to make them
    np.savez(tmp_path / "p.npz", **{"000001": np.zeros((0, 4)), "000002": np.ones((3, 4))})
    table = props.load_proposal_file(str(tmp_path / "p.npz"))
    with pytest.raises(props.ProposalError) as caught:
        table.get("000001")
    assert "image 000001 has no proposal in" in one_line(caught)
    with pytest.raises(props.ProposalError) as caught:
        table.get("000003")
    assert "no proposals for image 000003" in one_line(caught)
    with pytest.raises(props.ProposalError) as caught:
        props.ProposalCache(str(tmp_path / "empty")).get("000004")
    assert "no proposals for image 000004" in one_line(caught)
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(props.ProposalError, match="expected a directory"):
        props.load_proposal_file(str(tmp_path / "p.txt"))
    with pytest.raises(props.ProposalError, match="unknown selective search mode"):
        props.selective_search(np.zeros((8, 8, 3), np.uint8), "slow")
    # Without OpenCV: the package to install.
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(props.ProposalError) as caught:
        props.selective_search(np.zeros((8, 8, 3), np.uint8))
    assert f"pip install {props.OPENCV_PACKAGE}" in one_line(caught)
