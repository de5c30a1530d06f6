"""`python -m twin` is the `citytwin` command."""

import sys

from twin.cli.main import main

sys.exit(main())
