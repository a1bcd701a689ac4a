import sys

from vpt_robust.cli import main

sys.exit(main())
