"""``python -m kdops.train``: the trainer's command line (see :mod:`kdops.train.cli`)."""

import sys

from kdops.train.cli import main

sys.exit(main())
