"""``python -m kdops`` is the trainer's command line (see :mod:`kdops.train`)."""

import sys

from kdops.train import main

sys.exit(main())
