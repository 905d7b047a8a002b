"""Lifecycle stages: each module holds a plain core function and a thin KFP component.

Core functions take paths, typed config objects and frames and return a result object;
they import nothing from KFP. The KFP component beside each core maps artifacts and
parameters to core arguments, calls it and writes outputs and metrics.
"""
