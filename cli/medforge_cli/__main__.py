import sys

from medforge_cli.main import main

sys.exit(main())
