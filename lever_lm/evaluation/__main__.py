"""`python -m lever_lm.evaluation`: see lever_lm.evaluation.cli."""

from lever_lm.evaluation.cli import main

main()
