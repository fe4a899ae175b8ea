"""`python -m nnserve_client` runs the `nnserve` command line."""

import sys

from nnserve_client.cli import main

sys.exit(main())
