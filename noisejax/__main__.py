"""``python -m noisejax``: the ``noisejax`` command line (:mod:`noisejax.cli`)."""

import sys

from noisejax.cli import main

if __name__ == "__main__":
    sys.exit(main())
