"""The two files a job writes, named once: the container contract (io.contract) writes
them, and the standard-library-only output check (weights.expected) reads them."""

COVID_OUTPUT = "probability-covid-19.json"
SEVERE_OUTPUT = "probability-severe-covid-19.json"
