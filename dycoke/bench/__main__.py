import sys

from dycoke.bench.cli import main

sys.exit(main())
