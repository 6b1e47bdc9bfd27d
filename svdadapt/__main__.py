"""`python -m svdadapt ...`, `deepspeed --module svdadapt train RECIPE`, `torchrun -m svdadapt train RECIPE`."""

import sys

from svdadapt.cli import main

sys.exit(main())
