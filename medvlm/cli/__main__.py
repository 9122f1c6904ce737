"""``python -m medvlm.cli`` (what ``accelerate launch -m`` and ``torchrun -m`` run)."""

import sys

from medvlm.cli.app import main

sys.exit(main())
