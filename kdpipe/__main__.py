"""`python -m kdpipe`: the `kdpipe` command."""

import sys

from kdpipe.cli import main

sys.exit(main())
