"""The one type of the errors a user causes and can fix.

`UserError` is what the binaries show as ONE line (`<program>: error: <message>`, exit status 1,
runtime/cli.py): a bad flag, a file or folder that is missing or holds the wrong thing, data
that is not prepared, a run folder in use or of other settings. Every other exception (a plain
ValueError, a TensorFlow InvalidArgumentError, an out-of-memory error) is a bug or a failure
the zoo did not foresee, and keeps its traceback.

Raise a `UserError` only where the message names what the user gave (the flag, the file, the
value) and says what to do. Library-internal argument checks that only a programming error can
trip stay ValueError.

The subclasses below also derive from the built-in error they replace, so that code catching
ValueError or FileNotFoundError (to add the flag's name, say) still catches them:

    UserError           the root: one line, exit status 1
    InvalidInput        + ValueError: a value, flag or file content that cannot be used
    MissingInput        + FileNotFoundError: a file, folder or checkpoint that is not there

This module imports nothing, so every package may import it (data/__init__.py included).
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can act on; its message is one line naming what to fix."""


class InvalidInput(UserError, ValueError):
    """A value, flag or file content that cannot be used (the message names it)."""


class MissingInput(UserError, FileNotFoundError):
    """A file, folder or checkpoint the user named is not there (the message names it)."""
