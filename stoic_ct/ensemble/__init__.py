"""The ensemble of the two systems: its weights, fitted on out-of-fold predictions of both
(`fit-ensemble`), written to ensemble.json for `process.py --system ensemble`."""
