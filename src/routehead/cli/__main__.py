"""``python -m routehead.cli``."""

import sys

from routehead.cli import main

sys.exit(main())
