import sys

from moe_engine.cli import main

sys.exit(main())
