"""`python -m kforcing` (and `torchrun -m kforcing`) run the command line."""

import sys

from kforcing.cli.main import main

sys.exit(main())
