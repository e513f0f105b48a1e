"""`python -m convert SRC DST [--dtype ...]`, the same as `qwenvl-convert`."""
import sys

from convert.cli import main

sys.exit(main())
