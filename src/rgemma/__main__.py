"""`python -m rgemma ...` runs the `rgemma` command line (see `rgemma.cli`)."""

import sys

from rgemma.cli import main

if __name__ == "__main__":
    sys.exit(main())
