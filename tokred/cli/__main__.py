"""``python -m tokred.cli``: the same as the ``tokred`` console script."""
import sys

from tokred.cli import main

sys.exit(main())
