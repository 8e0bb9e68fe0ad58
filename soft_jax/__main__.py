"""`python -m soft_jax COMMAND ...`: the same as the `soft-jax` command."""

import sys

from soft_jax.cli.main import main

sys.exit(main())
