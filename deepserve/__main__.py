"""`python -m deepserve ...` is the `deepserve` command."""

import sys

from deepserve.cli import main

sys.exit(main())
