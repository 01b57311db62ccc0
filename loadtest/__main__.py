"""``python -m loadtest --url http://127.0.0.1:8000 ...``: see loadtest/README.md."""

import sys

from loadtest.cli import main

sys.exit(main())
