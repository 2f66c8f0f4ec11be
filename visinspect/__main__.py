"""`python -m visinspect ...` runs the command line (see visinspect.cli)."""

import sys

from visinspect.cli import main

sys.exit(main())
