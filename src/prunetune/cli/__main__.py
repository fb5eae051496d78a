"""``python -m prunetune.cli``: the command line."""

import sys

from prunetune.cli import main

sys.exit(main())
