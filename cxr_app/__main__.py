"""`python -m cxr_app …` is `cxr app …`."""

import sys

from cxr_app.cli import main

sys.exit(main(sys.argv[1:]))
