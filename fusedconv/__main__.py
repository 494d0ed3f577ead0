"""`python -m fusedconv ...`: the same as the `fusedconv` console script."""

import sys

from fusedconv.cli.parser import main

sys.exit(main())
