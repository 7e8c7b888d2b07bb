"""The checkpoint a reader uses (models/checkpoints.py): the newest intact one of a folder,
damage named in one line, explicit prefixes without fallback, rotation while reading."""

import os

import numpy as np
import pytest
import tensorflow as tf

from models import checkpoints
from models.checkpoints import (
    ChosenCheckpoint,
    Damaged,
    list_checkpoints,
    open_checkpoints,
    read_checkpoint,
    resolve_checkpoint,
)
from runtime.cli import run_or_fail
from runtime.errors import MissingInput

TRUNCATED = "truncated: Read less bytes than requested"


def _save(folder, values, keep=5) -> dict[int, str]:
    """Checkpoints of one variable `v` in `folder`, one per value, at steps 1, 2, ...:
    {step: prefix}. The variable is large enough for its data to dominate the shard."""
    v = tf.Variable(np.zeros(1000, np.float32))
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=v), str(folder), keep)
    saved = {}
    for step, value in enumerate(values, 1):
        v.assign(np.full(1000, value, np.float32))
        saved[step] = manager.save(checkpoint_number=step)
    return saved


def _value(chosen: ChosenCheckpoint) -> float:
    return float(chosen.tensors["v/.ATTRIBUTES/VARIABLE_VALUE"][0])


def _want(name):
    return name.startswith("v/")


def _truncate(prefix, size=2000):
    os.truncate(f"{prefix}.data-00000-of-00001", size)


def _flip(prefix, at=100):
    path = f"{prefix}.data-00000-of-00001"
    data = bytearray(open(path, "rb").read())
    data[at:at + 8] = bytes(b ^ 0xFF for b in data[at:at + 8])
    open(path, "wb").write(bytes(data))


def _offset_of_v(prefix, value) -> int:
    """Where the bytes of `v` (1000 x `value`, float32) start in the shard."""
    data = open(f"{prefix}.data-00000-of-00001", "rb").read()
    return data.index(np.full(1000, value, np.float32).tobytes())


def test_an_intact_folder_gives_its_newest_checkpoint_and_its_tensors(tmp_path):
    saved = _save(tmp_path, [1.0, 2.0, 3.0])
    lines = []
    chosen = read_checkpoint(str(tmp_path), _want, log=lines.append)
    assert (chosen.prefix, chosen.step, chosen.skipped, lines) == (saved[3], 3, (), [])
    assert set(chosen.tensors) == {"v/.ATTRIBUTES/VARIABLE_VALUE"} and _value(chosen) == 3.0
    assert chosen.skipped_line() is None and chosen.record() == {"path": saved[3], "step": 3}
    assert resolve_checkpoint(saved[2]) == saved[2]  # an explicit prefix: that one


@pytest.mark.parametrize("damage, reason", [
    (_truncate, f"{TRUNCATED}, reading _CHECKPOINTABLE_OBJECT_GRAPH"),  # read first
    (_flip, "Checksum does not match"),
])
def test_a_damaged_newest_checkpoint_is_skipped_with_one_line_naming_both(tmp_path, damage,
                                                                          reason):
    saved = _save(tmp_path, [1.0, 2.0, 3.0])
    damage(saved[3], _offset_of_v(saved[3], 3.0) + 100 if damage is _flip else 2000)
    lines = []
    chosen = read_checkpoint(str(tmp_path), _want, log=lines.append)
    assert (chosen.prefix, chosen.step, _value(chosen)) == (saved[2], 2, 2.0)
    assert [p for p, _ in chosen.skipped] == [saved[3]] and reason in chosen.skipped[0][1]
    if damage is _flip:  # v's own checksum
        assert chosen.skipped[0][1].endswith(", reading v/.ATTRIBUTES/VARIABLE_VALUE")
    assert lines == [chosen.skipped_line()]
    assert lines[0] == (f"skipped damaged checkpoint {saved[3]} ({chosen.skipped[0][1]}): "
                        f"using {saved[2]} (step 2) instead")
    assert chosen.record() == {"path": saved[2], "step": 2}
    # the same damaged prefix named explicitly: one line naming it, no fallback
    with pytest.raises(Damaged) as caught:
        read_checkpoint(saved[3])
    assert str(caught.value) == f"checkpoint {saved[3]} is damaged ({chosen.skipped[0][1]})"


def test_the_skipped_line_is_shown_once_per_process_on_stderr(tmp_path, capsys):
    saved = _save(tmp_path, [1.0, 2.0])
    _truncate(saved[2])
    assert resolve_checkpoint(str(tmp_path)) == saved[1]
    assert resolve_checkpoint(str(tmp_path)) == saved[1]
    err = capsys.readouterr().err
    assert err.splitlines() == [f"warning: skipped damaged checkpoint {saved[2]} ({TRUNCATED}, "
                                f"reading _CHECKPOINTABLE_OBJECT_GRAPH): using {saved[1]} "
                                "(step 1) instead"]


def test_no_intact_checkpoint_is_one_line_naming_the_folder_and_exit_1(tmp_path, capsys):
    saved = _save(tmp_path, [1.0, 2.0])
    _truncate(saved[1])
    _flip(saved[2], 0)  # the index's first tensor, whichever it is

    with pytest.raises(SystemExit) as caught:
        run_or_fail("prog", lambda _: read_checkpoint(str(tmp_path)), None)
    assert caught.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"prog: error: no intact checkpoint in {tmp_path}: all 2 are damaged "
                          "(newest ckpt-2: TensorBundle at ")
    assert "Checksum does not match" in err and len(err.splitlines()) == 1
    os.remove(f"{saved[2]}.index")  # a damaged index: one line too
    open(f"{saved[1]}.index", "wb").write(b"not an index")
    with pytest.raises(Damaged, match=rf"^checkpoint {saved[1]} is damaged \([^()]*sstable"
                       r"[^()]*, reading the index\)$"):
        read_checkpoint(saved[1])


def test_a_missing_prefix_or_empty_folder_is_missing_input(tmp_path):
    with pytest.raises(MissingInput, match=f"^no checkpoint in directory {tmp_path}$"):
        read_checkpoint(str(tmp_path))
    with pytest.raises(MissingInput, match=f"^{tmp_path}/ckpt-9 does not exist: give a run "
                       "folder or a checkpoint prefix$"):
        read_checkpoint(str(tmp_path / "ckpt-9"))


def test_listing_orders_by_step_and_drops_prefixes_without_an_index(tmp_path):
    saved = _save(tmp_path, [float(v) for v in range(1, 12)], keep=3)  # keeps 9, 10, 11
    # a stray checkpoint the state file does not list, and a listed one whose files are gone
    tf.train.Checkpoint(v=tf.Variable(1.0)).write(str(tmp_path / "ckpt-2"))
    assert len(tf.train.get_checkpoint_state(str(tmp_path)).all_model_checkpoint_paths) == 3
    (tmp_path / "checkpoint").write_text(
        'model_checkpoint_path: "ckpt-11"\n' + "".join(
            f'all_model_checkpoint_paths: "ckpt-{n}"\n' for n in (5, 9, 10, 11)))
    assert list_checkpoints(str(tmp_path)) == [saved[11], saved[10], saved[9],
                                               str(tmp_path / "ckpt-2")]


def test_a_checkpoint_rotated_away_while_it_is_read_is_read_again(tmp_path, monkeypatch):
    """The writer saves ckpt-3 and deletes ckpt-2 (max_to_keep=1) while ckpt-2 is read."""
    v = tf.Variable(np.zeros(1000, np.float32))
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=v), str(tmp_path), 1)
    for step in (1, 2):
        v.assign(np.full(1000, step, np.float32))
        manager.save(checkpoint_number=step)
    opened = []
    load = tf.train.load_checkpoint

    def rotating_load(prefix):
        opened.append(os.path.basename(prefix))
        if len(opened) == 1:
            v.assign(np.full(1000, 3, np.float32))
            manager.save(checkpoint_number=3)
        return load(prefix)

    monkeypatch.setattr(tf.train, "load_checkpoint", rotating_load)
    monkeypatch.setattr(checkpoints, "RETRY_SECONDS", 0)
    chosen = read_checkpoint(str(tmp_path), _want, log=None)
    assert opened == ["ckpt-2", "ckpt-3"]
    assert (chosen.prefix, chosen.skipped, _value(chosen)) == (str(tmp_path / "ckpt-3"), (), 3.0)

    def always_rotating(prefix):  # a writer faster than any read: give up after RETRIES
        opened.append(os.path.basename(prefix))
        v.assign_add(np.ones(1000, np.float32))
        manager.save(checkpoint_number=len(opened) + 3)
        return load(prefix)

    opened.clear()
    monkeypatch.setattr(tf.train, "load_checkpoint", always_rotating)
    with pytest.raises(MissingInput, match=f"^the checkpoints of {tmp_path} kept vanishing "
                       r"while they were read \(5 tries\)"):
        read_checkpoint(str(tmp_path), log=None)
    assert len(opened) == checkpoints.RETRIES


def test_open_checkpoints_resumes_from_the_newest_intact_checkpoint(tmp_path, capsys):
    step = tf.Variable(0)
    _, manager, _ = open_checkpoints(str(tmp_path), {"step": step}, keep=3)
    for value in (4, 8):
        step.assign(value)
        manager.save(checkpoint_number=value)
    _flip(str(tmp_path / "ckpt-8"), 0)
    again = tf.Variable(0)
    _, manager, latest = open_checkpoints(str(tmp_path), {"step": again}, keep=3)
    assert (latest, int(again.numpy())) == (str(tmp_path / "ckpt-4"), 4)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"warning: skipped damaged checkpoint {tmp_path}/ckpt-8 (")
    assert err[0].endswith(f"): using {tmp_path}/ckpt-4 (step 4) instead")
    again.assign(8)  # the next save at step 8 replaces the damaged one
    manager.save(checkpoint_number=8)
    assert read_checkpoint(str(tmp_path), log=None).prefix == str(tmp_path / "ckpt-8")
