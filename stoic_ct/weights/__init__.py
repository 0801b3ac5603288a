"""Model files: their names and sources, loading checkpoints, fetching them, random weights in
the published layouts, the expected outputs of the shipped test case.
"""
