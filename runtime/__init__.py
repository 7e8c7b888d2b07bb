"""The zoo's shared runtime: what every binary uses and no network needs.

    cli.py         the binaries' one idiom: config dataclass -> flags -> run, one-line errors
    vocabulary.py  the flags every binary names alike (--model_dir, --pretrained, ...), once
    progress.py    progress lines
    files.py       atomic file writes and the runs' JSON files
    run_config.py  a run's config.json
    ownership.py   who owns a run folder: lock, fingerprint, clean-up of dead processes
    errors.py      UserError: the errors a binary shows as one line
    version.py     the code version every run records in its config.json

Every package of the zoo may import this one; it imports none of them, and neither
TensorFlow nor Keras, so a binary checks its flags before the framework loads.
"""

__version__ = "0.1.0"
