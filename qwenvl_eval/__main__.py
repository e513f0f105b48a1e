import sys

from qwenvl_eval.cli import main

sys.exit(main())
