"""Data shipped with vidaccel: the reference model (assets/reference) and default LeMiCa plans."""
