"""`python -m lightspeed` == the `lightspeed` console script."""

import sys

from lightspeed.cli import main

sys.exit(main())
