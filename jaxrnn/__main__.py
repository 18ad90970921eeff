"""``python -m jaxrnn``: the ``jaxrnn`` command line."""

import sys

from jaxrnn.cli import main

sys.exit(main())
