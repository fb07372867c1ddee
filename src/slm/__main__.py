import sys

from slm.cli import main

sys.exit(main())
