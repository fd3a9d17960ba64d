"""``python -m xbench`` (also what ``torchrun -m xbench`` runs)."""

import sys

from xbench.cli import main

sys.exit(main())
