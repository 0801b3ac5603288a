"""Inputs: the one volume type, reading and checking scans, storage order, the container's
inputs and outputs, age and sex, training cohorts, public sample scans.
"""
