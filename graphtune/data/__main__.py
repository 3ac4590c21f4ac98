"""``python -m graphtune.data curate config.yaml``."""

import sys

from graphtune.data.cli import main

sys.exit(main())
