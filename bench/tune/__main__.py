"""`python -m bench.tune`: `ringserve tune` without the engine's command line."""

import sys

from bench.tune.cli import main

sys.exit(main())
