"""`python -m lightspeed.bench`: the same as `lightspeed bench`."""

from lightspeed.bench.cli import main

raise SystemExit(main())
