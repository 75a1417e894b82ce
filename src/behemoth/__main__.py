import sys

from behemoth.cli import main

sys.exit(main())
