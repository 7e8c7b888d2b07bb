"""`runtime.cli.run_or_fail`: one line for what the user can fix, a traceback for a bug."""

import errno
import subprocess
import sys
import textwrap

import pytest
import tensorflow as tf

from data import DataError
from models.checkpoints import resolve_checkpoint
from runtime.cli import UsageError, describe, run_or_fail
from runtime.errors import InvalidInput, MissingInput, UserError
from runtime.ownership import RunLocked, RunMismatch


def _run(error: BaseException, capsys) -> tuple[int | None, str]:
    """(exit status or None when the error propagated, stderr) of run_or_fail raising it."""
    def run(_config):
        raise error

    try:
        run_or_fail("prog", run, None)
    except SystemExit as exit_:
        return exit_.code, capsys.readouterr().err
    except BaseException as propagated:
        assert propagated is error
        return None, capsys.readouterr().err
    raise AssertionError("run_or_fail returned")


@pytest.mark.parametrize("error", [
    UsageError("--x=1: must be >= 2"), RunLocked("runs/a is in use"),
    RunMismatch("runs/a holds a run with other settings"), DataError("dataset mnist is not "
                                                                    "prepared"),
    InvalidInput("checkpoint c is not compatible"), MissingInput("no checkpoint in directory d"),
])
def test_a_user_error_is_one_line_and_exit_1(error, capsys):
    assert isinstance(error, UserError)
    status, err = _run(error, capsys)
    assert status == 1
    assert err == f"prog: error: {error}\n"


@pytest.mark.parametrize("error", [
    ValueError("Input 0 of layer dense is incompatible with the layer: expected axis -1 "
               "of input shape to have value 64"),
    FileNotFoundError("a message without errno"),
    RuntimeError("an unforeseen failure"),
    tf.errors.InvalidArgumentError(None, None, "indices[3] = 7 is repeated"),
    tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape"
                                                 "[1024,1024,1024]"),
    tf.errors.UnknownError(None, None, "something broke"),
])
def test_a_bug_propagates_with_its_traceback(error, capsys):
    assert describe(error) is None
    status, err = _run(error, capsys)
    assert status is None  # re-raised: the interpreter prints the traceback, exit status 1
    assert "error:" not in err


def test_os_failures_stay_one_line(capsys):
    full = OSError(errno.ENOSPC, "No space left on device", "/runs/a/ckpt-3_temp/x")
    assert _run(full, capsys) == (1, "prog: error: no space left on the device of "
                                     "/runs/a/ckpt-3_temp/x; free some space and rerun (a run "
                                     "resumes from its last complete checkpoint)\n")
    read_only = tf.errors.PermissionDeniedError(
        None, None, "/runs/a/ckpt-3_temp/part-0.tempstate123; Read-only file system")
    assert describe(read_only) == ("cannot write /runs/a: read-only file system; choose a "
                                   "folder you can write to")
    gone = tf.errors.NotFoundError(None, None, "/data/x.png; No such file or directory")
    assert describe(gone) == "/data/x.png does not exist"


def test_a_missing_checkpoint_is_a_user_error(tmp_path, capsys):
    def run(_config):
        resolve_checkpoint(str(tmp_path / "nothing"))

    with pytest.raises(SystemExit) as caught:
        run_or_fail("prog", run, None)
    assert caught.value.code == 1
    assert capsys.readouterr().err == (f"prog: error: {tmp_path / 'nothing'} does not exist: "
                                       "give a run folder or a checkpoint prefix\n")


@pytest.mark.slow
def test_a_binary_shows_the_traceback_of_a_bug_and_one_line_for_the_user():
    script = textwrap.dedent("""
        import sys
        from runtime.cli import UsageError, run_or_fail

        def run(kind):
            import tensorflow as tf  # after run_or_fail quiets it, as in a binary

            if kind == "bug":
                tf.gather(tf.zeros([3]), [7])
            raise UsageError("--flag=7: must be < 3")

        run_or_fail("prog", run, sys.argv[1])
    """)
    bug = subprocess.run([sys.executable, "-c", script, "bug"], capture_output=True,
                         text=True, timeout=120)
    assert bug.returncode == 1
    assert "Traceback (most recent call last)" in bug.stderr
    assert "InvalidArgumentError" in bug.stderr
    user = subprocess.run([sys.executable, "-c", script, "user"], capture_output=True,
                          text=True, timeout=120)
    assert user.returncode == 1
    assert user.stderr == "prog: error: --flag=7: must be < 3\n"
