import sys

from credit.cli import console_main

sys.exit(console_main())
