"""The heads' nested cross-validation defaults, in a module light enough for the command
line's help to show them (evaluation.py, final training and `evaluate` use them)."""

OUTER_FOLDS = 8  # outer folds of each split
REPEATS = 4  # repetitions of the split, each with its own seed
