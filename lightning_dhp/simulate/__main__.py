"""``python -m lightning_dhp.simulate``: see :mod:`lightning_dhp.simulate.cli`."""

import sys

from lightning_dhp.simulate.cli import main

sys.exit(main())
