import sys

from jaxsd.cli import main

sys.exit(main())
