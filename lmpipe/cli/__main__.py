"""``python -m lmpipe.cli``: the ``lmpipe`` command."""

import sys

from lmpipe.cli import main

sys.exit(main())
