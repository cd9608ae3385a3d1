#!/usr/bin/env python
"""`python run.py job.yaml [job2.yaml ...]`, as ai-toolkit users type it; same as `aitk run`."""

import sys

from aitk.cli import main

if __name__ == "__main__":
    sys.exit(main())
