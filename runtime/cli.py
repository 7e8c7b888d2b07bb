"""The one idiom of the zoo's binaries.

A binary is a light module `X.py` (its docstring, a frozen config dataclass and `main`) and a
heavy `run(config)` function in `X_lib.py` beside it, which `main` names as
"package.X_lib:run" (`load_run`):

- the dataclass owns every default; each field declared with `option(...)` becomes a flag of
  the same name, type and default (`define_flags`), so a config built in code and one built
  from the command line agree; `__post_init__` checks values and raises `UsageError`;
- `main(...)` parses the command line into a fresh `flags.FlagValues` (flagfiles included),
  builds the config, and only then imports TensorFlow (quietly) and the run's module, so a bad
  flag fails in well under a second;
- every failure the user can act on is ONE line on stderr, `<program>: error: <message>`,
  and exit status 1: absl's own flag errors, every `runtime.errors.UserError` (`UsageError`,
  a run folder in use or of other settings (runtime/ownership.py), data that is not there,
  a missing or incompatible checkpoint), and the operating system's file-system failures
  (missing, vanished or unreadable files, full or read-only disks), which name the path and
  what to do. Anything else is a bug and keeps its traceback. `--help` prints the
  binary's docstring and its flags, `--helpfull` every flag; both exit 0. `--check_flags`
  checks the flags (a flagfile, say) and exits 0 without doing anything.

Verbosity: `-v 0` (default) shows the binary's own output and errors only (libraries' logs
at ERROR); `-v 1` adds their warnings and INFO logs and the tracebacks of failures; `-v 2`
adds TensorFlow's C++ start-up logs.

This module imports neither TensorFlow nor Keras.
"""

from __future__ import annotations

import dataclasses
import errno
import importlib
import json
import os
import re
import sys
import tempfile
import types
import typing
from collections.abc import Callable, Sequence

from absl import flags

from runtime.errors import InvalidInput, UserError

EXIT_ERROR = 1


class UsageError(InvalidInput):
    """A flag, file or value that cannot be used; the message names it and says what to do."""


def option(default, help: str, *, choices: Sequence[str] | None = None,
           lower: float | None = None, upper: float | None = None, flag: bool = True):
    """A config field that is also a flag (unless `flag=False`: settable in code only)."""
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": tuple(choices) if choices else None, "lower": lower,
        "upper": upper, "flag": flag})


def _kind(annotation) -> tuple[type, bool]:
    """(base type, optional) of a field annotation: int, float, bool, str or tuple."""
    optional = False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0]
    if typing.get_origin(annotation) is tuple:
        return tuple, optional
    return annotation, optional


def _tuple_item_type(annotation) -> type:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    args = typing.get_args(annotation)
    return args[0] if args else str


def flag_fields(config_type: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(config_type) if f.metadata.get("flag", False)]


def define_flags(config_type: type, fv: flags.FlagValues, module_name: str) -> None:
    """One flag per `option` field of `config_type`, attributed to `module_name` (so that
    `--help` of that binary lists them)."""
    hints = typing.get_type_hints(config_type)
    for field in flag_fields(config_type):
        meta = field.metadata
        base, _ = _kind(hints[field.name])
        common = dict(flag_values=fv, module_name=module_name)
        bounds = {k: meta[m] for k, m in (("lower_bound", "lower"), ("upper_bound", "upper"))
                  if meta[m] is not None}
        default = field.default
        if base is bool:
            flags.DEFINE_boolean(field.name, default, meta["help"], **common)
        elif base is int:
            flags.DEFINE_integer(field.name, default, meta["help"], **bounds, **common)
        elif base is float:
            flags.DEFINE_float(field.name, default, meta["help"], **bounds, **common)
        elif base is tuple:
            flags.DEFINE_list(field.name, None if default is None else [str(v) for v in default],
                              meta["help"], **common)
        elif meta["choices"]:
            flags.DEFINE_enum(field.name, default, list(meta["choices"]), meta["help"], **common)
        else:
            flags.DEFINE_string(field.name, default, meta["help"], **common)


def config_from_flags(config_type: type, fv: flags.FlagValues, **overrides):
    """`config_type` from parsed flags (lists become tuples of the field's item type)."""
    hints = typing.get_type_hints(config_type)
    values = {}
    for field in flag_fields(config_type):
        value = fv[field.name].value
        if _kind(hints[field.name])[0] is tuple and value is not None:
            item = _tuple_item_type(hints[field.name])
            try:
                value = tuple(item(v) for v in value)
            except ValueError:
                raise UsageError(f"--{field.name}={','.join(value)}: expected a comma-separated "
                                 f"list of {item.__name__}") from None
        values[field.name] = value
    values.update(overrides)
    return config_type(**values)


def check_choice(name: str, value, choices: Sequence) -> None:
    """UsageError naming `--name` unless value is one of choices."""
    if value not in choices:
        raise UsageError(f"--{name}={value}: choose one of {', '.join(map(str, choices))}")


def require(name: str, value) -> None:
    """UsageError naming `--name` when a required flag is empty."""
    if value in (None, "", ()):
        raise UsageError(f"--{name} is required (see --help)")


def json_object(name: str, text: str) -> dict:
    """The JSON object of flag `--name`; UsageError when it is not one."""
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as error:
        raise UsageError(f"--{name} is not JSON: {error}") from None
    if not isinstance(value, dict):
        raise UsageError(f"--{name} must be a JSON object")
    return value


def check_range(name: str, value, lower=None, upper=None) -> None:
    """UsageError naming `--name` unless lower <= value <= upper (None: unbounded)."""
    if (lower is not None and value < lower) or (upper is not None and value > upper):
        bounds = " and ".join(s for s in (f">= {lower}" if lower is not None else "",
                                          f"<= {upper}" if upper is not None else "") if s)
        raise UsageError(f"--{name}={value}: must be {bounds}")


# ------------------------------------------------------------------------- running binaries


def load_run(target: str | Callable) -> Callable:
    """The function named by `target`, "package.module:function", imported now: a binary
    names its run this way so that its heavy module (and TensorFlow) loads only after the
    flags are checked. A function is returned as it is (code that already holds one)."""
    if callable(target):
        return target
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def fail(program: str, message: str) -> typing.NoReturn:
    """One line `<program>: error: <message>` on stderr, then exit status 1."""
    first = " ".join(str(message).split("\n")[0].split()) or "unknown error"
    sys.stderr.write(f"{program}: error: {first}\n")
    sys.stderr.flush()
    sys.exit(EXIT_ERROR)


def describe_os_error(error: OSError) -> str:
    """One line for an OSError: the path, what went wrong and what to do."""
    path = error.filename or "a file"
    code = error.errno
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (f"cannot write {path}: {error.strerror.lower()}; choose a folder you can write "
                "to")
    if code in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device of {path}; free some space and rerun (a run "
                "resumes from its last complete checkpoint)")
    if code == errno.ENOENT:
        return f"{path} does not exist"
    return f"{path}: {error.strerror or error}"


# File-system failures inside TensorFlow ops arrive as text ("<path>; No space left on
# device"): the errno each stands for.
_OS_FAILURES = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
                "Read-only file system": errno.EROFS, "Permission denied": errno.EACCES,
                "No such file or directory": errno.ENOENT}


def _visible_path(path: str) -> str:
    """`path` up to the first temporary component (a checkpoint's `ckpt-N_temp`, a `.tempstate`
    file, an export's `.tmp-V-PID`): the folder the user chose, not TensorFlow's scratch."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        if part.endswith("_temp") or ".tempstate" in part or part.startswith(".tmp-"):
            return "/".join(parts[:i]) or path
    return path


def _os_failure(line: str) -> OSError | None:
    """The OSError a TensorFlow message line stands for, with the path it names, or None."""
    for text, code in _OS_FAILURES.items():
        match = re.search(rf"(\S+?)\s*[;:]?\s*{text}", line)
        if match:
            return OSError(code, os.strerror(code), _visible_path(match.group(1)))
    return None


def describe(error: BaseException) -> str | None:
    """The one-line message of an error the user can act on, or None for a bug.

    One line: a `UserError` (runtime/errors.py), an OSError with an errno (disk full,
    read-only, permission denied, no such file), and a TensorFlow OpError whose text is one of
    those file-system failures. Everything else is None (the traceback is shown): a plain
    ValueError, a shape or argument error inside TensorFlow, an out-of-memory error.
    """
    if isinstance(error, UserError):
        return str(error)
    if isinstance(error, OSError) and error.errno is not None:
        return describe_os_error(error)
    module = type(error).__module__
    if module.startswith("tensorflow") and hasattr(error, "message"):
        # tf.errors.OpError: only the file-system failures of _OS_FAILURES are the user's
        lines = [line.strip() for line in str(error.message).splitlines() if line.strip()]
        useful = [line for line in lines if not line.startswith(("Graph execution error",
                                                                 "Detected at node"))]
        line = (useful or lines or [type(error).__name__])[0]
        line = re.sub(r"\{\{function_node [^}]*\}\}\s*|\s*\[Op:[^\]]*\]$", "", line)
        failure = _os_failure(line)
        return describe_os_error(failure) if failure is not None else None
    return None


def quiet_tensorflow(verbosity: int = 0) -> None:
    """Import TensorFlow without its start-up logs (unless verbosity >= 2) and set the
    Python-side loggers (absl, tensorflow) to ERROR (INFO with verbosity >= 1).

    The C++ runtime writes its start-up lines before its log settings apply, so stderr is
    sent to a temporary file during the import and device discovery, and that text is shown
    only if the import fails.
    """
    if verbosity < 2:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" not in sys.modules and verbosity < 2:
        saved = os.dup(2)
        with tempfile.TemporaryFile() as captured:
            os.dup2(captured.fileno(), 2)
            try:
                import tensorflow as tf

                tf.config.list_physical_devices()
                import keras  # noqa: F401
            except BaseException:
                os.dup2(saved, 2)
                captured.seek(0)
                sys.stderr.write(captured.read().decode("utf-8", "replace"))
                raise
            finally:
                os.dup2(saved, 2)
                os.close(saved)
    import tensorflow as tf
    from absl import logging

    # The binaries parse their own FlagValues; absl's global flags are marked parsed so that
    # absl logs without its "before flag parsing" preamble.
    flags.FLAGS.mark_as_parsed()
    level = "INFO" if verbosity >= 1 else "ERROR"
    logging.set_verbosity(level.lower())
    logging.use_absl_handler()
    tf.get_logger().setLevel(level)


def _help(doc: str, fv: flags.FlagValues, module_name: str, full: bool) -> str:
    text = (doc or "").strip()
    flags_text = fv.get_help() if full else fv.module_help(module_name)
    return f"{text}\n\nFlags:\n{flags_text}\n" if text else f"{flags_text}\n"


def main(program: str, config_type: type, run: str, *, module_name: str, doc: str = "",
         argv: Sequence[str] | None = None, positional: str | None = None) -> None:
    """The whole life of a binary: flags -> config -> quiet TensorFlow -> `run(config)`, where
    `run` names the function as "package.module:function" (`load_run`).

    `config_type` is built by `config_from_flags`; `positional` names the config field that
    one positional argument fills (a sub-command), if any. On failure, exits 1 with one line
    (module docstring).
    """
    argv = list(sys.argv if argv is None else argv)
    fv = flags.FlagValues()
    define_flags(config_type, fv, module_name)
    common = dict(flag_values=fv, module_name=module_name)
    flags.DEFINE_integer("verbosity", 0, "0: warnings and errors; 1: INFO logs and tracebacks; "
                         "2: TensorFlow's C++ logs too.", short_name="v", **common)
    flags.DEFINE_boolean("help", False, "Show this binary's flags and exit.", short_name="h",
                         **common)
    flags.DEFINE_boolean("helpfull", False, "Show every flag, absl's included, and exit.",
                         **common)
    flags.DEFINE_boolean("check_flags", False, "Check the flags (and flagfiles) and exit: "
                         "nothing is loaded, trained or written.", **common)
    try:
        rest = fv(argv)
    except flags.Error as error:
        fail(program, f"{error} (see --help)")
    if fv["help"].value or fv["helpfull"].value:
        sys.stdout.write(_help(doc, fv, module_name, fv["helpfull"].value))
        sys.exit(0)
    extra = {}
    if positional is not None and len(rest) == 2:
        extra[positional] = rest.pop()
    if len(rest) > 1:
        fail(program, f"unexpected argument {rest[1]!r}: every setting is a --flag (see --help)")
    verbosity = fv["verbosity"].value
    try:
        config = config_from_flags(config_type, fv, **extra)
    except UsageError as error:
        fail(program, str(error))
    if fv["check_flags"].value:
        sys.stdout.write(f"{program}: the flags are valid\n")
        sys.exit(0)
    run_or_fail(program, run, config, verbosity)


def run_or_fail(program: str, run: str | Callable, config, verbosity: int = 0):
    """`run(config)` after `quiet_tensorflow`, `run` being a function or its
    "package.module:function" (`load_run`); an error the user can act on becomes one line and
    exit status 1 (a bug keeps its traceback, as does any error with verbosity >= 1)."""
    try:
        quiet_tensorflow(verbosity)
        return load_run(run)(config)
    except KeyboardInterrupt:
        fail(program, "interrupted")
    except Exception as error:
        message = describe(error)
        if message is None or verbosity >= 1:
            raise
        fail(program, message)
