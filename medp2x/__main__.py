import sys

from medp2x.cli import main

sys.exit(main())
