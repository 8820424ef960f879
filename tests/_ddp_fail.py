"""A torchrun worker for tests/test_distributed.py: `kforcing argv` in which rank 1's data loader
fails at its third batch, as a disk error or a bad shard would."""

import os
import sys

from kforcing.cli.main import main
from kforcing.errors import KForcingError
from kforcing.io.tokens import BlockLoader

calls = {"n": 0}
next_batch = BlockLoader.next_batch


def failing_next_batch(self):
    calls["n"] += 1
    if os.environ.get("RANK") == "1" and calls["n"] == 3:
        raise KForcingError("injected failure: rank 1 cannot read its shard")
    return next_batch(self)


BlockLoader.next_batch = failing_next_batch
sys.exit(main(sys.argv[1:]))
