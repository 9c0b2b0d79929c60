"""`python -m dsv32_jax.cli ...` (the same as `dsv32 ...`)."""

import sys

from dsv32_jax.cli import main

sys.exit(main())
