"""``python -m peftlab``: the same command line as the ``peftlab`` script (for torchrun and bare checkouts)."""

import sys

from peftlab.cli import main

sys.exit(main())
