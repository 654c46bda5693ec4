"""``python -m advdetect.run.schemas [--check]``: regenerate (or check) the shipped JSON Schemas."""

import sys

from advdetect.run.schemas import main

sys.exit(main())
