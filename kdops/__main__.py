"""``python -m kdops`` is the trainer's command line, the same as ``python -m kdops.train``."""

import sys

from kdops.train.cli import main

sys.exit(main())
