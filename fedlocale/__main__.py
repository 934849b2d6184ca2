"""``python -m fedlocale``."""

import sys

from fedlocale.cli import main

sys.exit(main())
