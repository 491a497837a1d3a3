"""Stand-in for NVlabs/edm2's ``dnnlib`` package (tests only; our own code, no edm2 code)."""
