import sys

from spank_sif.cli import main

sys.exit(main())
