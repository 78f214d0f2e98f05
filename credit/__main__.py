import sys

from credit.cli import main

sys.exit(main())
