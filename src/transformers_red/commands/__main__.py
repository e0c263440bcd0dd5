"""`python -m transformers_red.commands NAME ...`: the `transformers-red` dispatcher as a module, which is what
`accelerate launch -m transformers_red.commands` and `torchrun -m transformers_red.commands` start on every
process."""

import sys

from . import main

sys.exit(main())
