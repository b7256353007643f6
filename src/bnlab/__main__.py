"""``python -m bnlab``: the ``bnlab`` command (where the script is not on PATH)."""

import sys

from bnlab.cli import main

sys.exit(main())
