"""Atomic writes (runtime/files.py)."""

import json
import os

import pytest

from runtime.files import write_atomic, write_json_atomic, write_json_if_changed


def test_atomic_writes_leave_nothing_half_written(tmp_path):
    path = str(tmp_path / "results.json")
    write_json_atomic(path, {"a": 1})

    def breaks(tmp):
        with open(tmp, "w") as f:
            f.write('{"a": ')
        raise OSError(28, "No space left on device", tmp)

    with pytest.raises(OSError):
        write_atomic(path, breaks)
    assert os.listdir(tmp_path) == ["results.json"]
    assert json.loads(open(path).read()) == {"a": 1}
    assert not write_json_if_changed(path, {"a": 1})
    assert write_json_if_changed(path, {"a": 2})
