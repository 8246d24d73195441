import sys

from fincluster.cli import main

sys.exit(main())
