"""The kdops trainer: teachers, students, the method registry, run logs, datasets, models and the demo.

It stands on kdops' public API alone (``kdops.functional``, ``kdops.nn``, ``kdops.reference``), exactly as a
user's own training script would; nothing in the loss library imports it. The command line is
``python -m kdops.train`` (or the ``kdops`` script): see :mod:`kdops.train.cli`.
"""

from kdops.train.cli import main  # noqa: F401
