"""``python -m prunetune``: the command line."""

import sys

from prunetune.cli import main

sys.exit(main())
