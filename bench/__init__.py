"""fusedconv's benchmark suite: layers, models and re-parameterization, with results and plots.

Run with `python -m bench [--quick]` from the repository root, or `fusedconv bench`.
"""
