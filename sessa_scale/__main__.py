"""`python -m sessa_scale ...` (the form to use under torchrun or srun)."""

import sys

from sessa_scale.cli import main

sys.exit(main())
