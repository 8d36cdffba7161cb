"""Run the dicomfs command: ``python -m dicomfs``."""

import sys

from dicomfs.cli import main

if __name__ == "__main__":  # spawned ingest workers import this module again: they must not run it
    sys.exit(main())
