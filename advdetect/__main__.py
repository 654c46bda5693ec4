import sys

from advdetect.cli.commands import main

sys.exit(main())
