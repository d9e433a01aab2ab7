"""Entry point of ``python -m patchslim``."""

import sys

from patchslim.cli import main

sys.exit(main())
