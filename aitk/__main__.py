import sys

from aitk.cli import main

sys.exit(main())
