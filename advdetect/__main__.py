import sys

from advdetect.cli import main

sys.exit(main())
