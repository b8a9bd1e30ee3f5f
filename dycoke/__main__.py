import sys

from dycoke.cli import main

sys.exit(main())
