"""Calibration data for qcache: pools collected along cached trajectories and the selectors that pick from them."""
