"""`python -m convert ...` (the same as `dsv32 convert ...`)."""

import sys

from convert.cli import main

sys.exit(main())
