"""`python -m distributed_training.localnet`: the same as dt-local-swarm."""

import sys

from .cli import main

sys.exit(main())
