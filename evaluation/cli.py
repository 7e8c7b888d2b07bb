"""What the evaluation binaries share: one-line failures, parsing into fresh flags, the run
flags of the VOC protocols, and their resumable checkpoints.

Binaries define their flags in `define_flags(flag_values)`, called only when run as a program,
so importing a binary defines nothing and tests parse into their own `flags.FlagValues`.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

import keras
import tensorflow as tf
from absl import flags, logging

from models.layers import PREPROCESSINGS
from models.weights import named_variables


def fail(program: str, message: str) -> None:
    """Exit with status 2 after one line `<program>: error: <message>` on stderr."""
    sys.stderr.write(f"{program}: error: {message}\n")
    sys.exit(2)


def parse_and_run(program: str, define_flags: Callable[[flags.FlagValues], None],
                  main: Callable[[list[str], flags.FlagValues], None], argv: list[str]) -> None:
    """Parse `argv` (argv[0] is the program) into fresh flags and call `main(argv[:1], fv)`:
    the program's own path without absl's global state. A flag error is one line."""
    fv = flags.FlagValues()
    define_flags(fv)
    try:
        fv(argv)
    except flags.Error as error:
        fail(program, str(error))
    main(argv[:1], fv)


def run_and_print(program: str, argv: list[str], run: Callable[[], tuple[object, str]],
                  errors: tuple[type[Exception], ...]) -> None:
    """The body of a binary's main: no stray arguments, `run()` -> (result, table), the table
    printed; an exception of `errors` becomes one line and exit status 2."""
    if len(argv) > 1:
        fail(program, f"unexpected arguments {' '.join(argv[1:])}")
    try:
        _, table = run()
    except errors as error:
        fail(program, str(error))
    print(table)


def run_or_exit(program: str, run: Callable, config_fn: Callable):
    """`run(config_fn())`; a bad setting, checkpoint or data directory exits with one line
    naming the flag, file or value at fault, and no traceback."""
    try:
        return run(config_fn())
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"{program}: error: {error}")


def config_from_flags(config_type: type, flag_values: flags.FlagValues, **converters):
    """`config_type` (a dataclass with a field per flag) from parsed flags; `converters` map a
    field name to a function applied to its flag value."""
    values = {field.name: flag_values[field.name].value
              for field in dataclasses.fields(config_type)}
    for name, convert in converters.items():
        values[name] = convert(values[name])
    return config_type(**values)


def define_voc_run_flags(defaults, flag_values: flags.FlagValues) -> None:
    """The flags both VOC protocols take, with the defaults of their config dataclass."""
    d, fv = defaults, {"flag_values": flag_values}
    flags.DEFINE_string("model_dir", None, "Output directory: checkpoints, config, results.", **fv)
    flags.DEFINE_string("init_checkpoint", d.init_checkpoint,
                        "Pretraining model_dir or checkpoint prefix ('' = random init).", **fv)
    flags.DEFINE_enum("preprocessing", None, list(PREPROCESSINGS),
                      "Input front; default: the pretraining run's config.json, else sobel.", **fv)
    flags.DEFINE_integer("checkpoint_every", d.checkpoint_every, "Steps between checkpoints.", **fv)
    flags.DEFINE_integer("keep_checkpoints", d.keep_checkpoints, "Checkpoints to keep.", **fv)
    flags.DEFINE_integer("log_every", d.log_every, "Steps between log lines.", **fv)
    flags.DEFINE_integer("seed", d.seed, "Random seed.", **fv)
    flags.DEFINE_string("data_dir", d.data_dir, "tfds data_dir ('' = tfds default).", **fv)
    flags.DEFINE_string("manual_dir", d.manual_dir, "tfds manual_dir for --download.", **fv)
    flags.DEFINE_bool("download", d.download, "Prepare voc/2007 first (may download).", **fv)
    flags.mark_flag_as_required("model_dir", flag_values=flag_values)


def resume(net: keras.Model, optimizer: keras.optimizers.Optimizer, model_dir: str,
           keep: int) -> tuple[tf.train.CheckpointManager, bool]:
    """The checkpoint manager of a run in `model_dir` (network by name-keyed variables, and the
    built optimizer with its step), restored from the latest checkpoint when there is one.

    Returns (manager, resumed).
    """
    checkpoint = tf.train.Checkpoint(model=named_variables(net), optimizer=optimizer)
    tf.io.gfile.makedirs(model_dir)
    manager = tf.train.CheckpointManager(checkpoint, model_dir, max_to_keep=keep)
    resumed = manager.latest_checkpoint is not None
    if resumed:
        checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        logging.info("resumed from %s at step %d", manager.latest_checkpoint,
                     int(optimizer.iterations.numpy()))
    return manager, resumed
