"""The ensemble's nested cross-validation defaults, in a module light enough for the
command line's help to show them (fitting.py and `fit-ensemble` use them)."""

FOLDS = 5  # outer folds of each split
REPEATS = 10  # repetitions of the split, each with its own seed
