"""python -m weightmerge"""

import sys

from weightmerge.cli import main

sys.exit(main())
