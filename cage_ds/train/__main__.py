"""``python -m cage_ds.train`` = ``cage-train`` (see cli.py)."""

import sys

from .cli import main

sys.exit(main())
