"""What the project's validation grid (``basic-llava sweep``, :mod:`basic_plugin.lab.sweep`) selected.

Copied from the grid's result recorded in docs/RESULTS.md, so that ``basic-llava demo`` trains
the setting the grid chose (not only the paper's defaults) and opens with what the grid found
before this run's numbers. Change the three together, from docs/RESULTS.md, when the grid is
run again.
"""

#: the sweep configuration chosen on the validation split (a name of ``sweep.CONFIGS``)
NAME: str = "paper"
#: its BASIC flags as the grid ran them (placeholders resolved, e.g. ("--basic_lambda_das", "0.1")); () = paper defaults
FLAGS: tuple = ()
#: one or two sentences: what the grid found on the test split, and why
VERDICT: str = "The validation grid has not been recorded yet."
