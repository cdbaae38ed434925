import sys

from qntx.cli import main

sys.exit(main())
