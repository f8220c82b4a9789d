"""`python -m wasmproxy` is the `wasmproxy` command."""

import sys

from .cli import main

sys.exit(main())
