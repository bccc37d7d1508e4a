"""python -m weightmerge.cli"""

import sys

from weightmerge.cli import main

sys.exit(main())
