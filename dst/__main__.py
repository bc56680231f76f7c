import sys

from dst.cli import main

sys.exit(main())
