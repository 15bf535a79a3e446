"""`python -m hetmem ...` is the `hetmem` command."""
import sys

from hetmem.cli import main

sys.exit(main())
