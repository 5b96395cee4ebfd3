"""``python -m kcm_core``: see ``kcm_core.cli``."""
import sys

from .cli import main

sys.exit(main())
