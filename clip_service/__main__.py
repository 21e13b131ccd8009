"""`python -m clip_service COMMAND`: the command-line tools of clip_service.cli."""

import sys

from clip_service.cli import main

sys.exit(main())
