"""`python -m autosp` = the `autosp` command."""

import sys

from autosp.cli import main

sys.exit(main())
