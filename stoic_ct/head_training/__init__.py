"""Training Balaïtous's heads: features of a cohort, fitting the logistic regressions,
nested cross-validation.
"""
