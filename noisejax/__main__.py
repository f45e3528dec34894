"""``python -m noisejax``: the ``noisejax`` command line (:mod:`noisejax.cli`)."""

from noisejax.cli import run

if __name__ == "__main__":
    run()
