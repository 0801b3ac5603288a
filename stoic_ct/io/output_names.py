"""The two files a job writes, named once: the container contract (io.contract) writes
them, and the standard-library-only output check (scripts/check_outputs.py) reads them."""

COVID_OUTPUT = "probability-covid-19.json"
SEVERE_OUTPUT = "probability-severe-covid-19.json"
