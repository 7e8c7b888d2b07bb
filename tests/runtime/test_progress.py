"""Progress lines: redrawn on a terminal, plain lines in a log, messages on their own lines."""

import io

from runtime.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_file_gets_plain_lines_without_control_characters():
    out = io.StringIO()
    bar = Progress(10, "fine-tuning", stream=out, interval=0.0)
    for done in range(1, 11):
        bar.update(done, loss=1.0 / done)
        if done == 5:
            bar.log("epoch 5: learning rate cut to 0.001")
    bar.close()
    bar.close()  # closing twice prints nothing more
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\033" not in out.getvalue()
    assert lines[0].startswith("fine-tuning   1/10") and "loss 1" in lines[0]
    assert "epoch 5: learning rate cut to 0.001" in lines
    assert lines[-1].startswith("fine-tuning  10/10") and lines[-1].endswith("loss 0.1")
    assert len(lines) == 10 + 1 + 1  # every update (interval 0), the message, the final line


def test_a_log_file_is_not_flooded():
    out = io.StringIO()
    bar = Progress(1000, "steps", stream=out, interval=3600.0)
    for done in range(1, 1001):
        bar.update(done)
    bar.close()
    assert len(out.getvalue().splitlines()) == 2  # the first update and the final line


def test_a_terminal_line_is_redrawn_and_messages_do_not_share_it():
    out = Terminal()
    bar = Progress(4, "probe", stream=out, interval=0.0)
    bar.update(1)
    bar.log("a message")
    bar.update(4)
    bar.close()
    text = out.getvalue()
    assert "\r\033[K" in text and text.endswith("\n")
    assert "\r\033[Ka message\n" in text  # the bar is erased before the message
    assert text.count("\n") == 2  # the message and the final bar


def test_unknown_total():
    out = io.StringIO()
    bar = Progress(None, "images", stream=out, interval=0.0, unit=" img")
    bar.update(7)
    bar.close()
    assert out.getvalue().splitlines()[-1].startswith("images  7 img")


def test_short_work_with_a_delay_prints_nothing():
    out = io.StringIO()
    bar = Progress(10, "probe", stream=out, interval=0.0, delay=60.0)
    for done in range(1, 11):
        bar.update(done)
    bar.close()
    assert out.getvalue() == ""
