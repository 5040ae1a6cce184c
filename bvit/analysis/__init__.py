"""Analyses of trained models: `measure.py` (pure measurements per step), `pruning.py` (step-specific
pruning: the steps x components importance matrix) and `plots.py` (their figures).

Import the module you need (`bvit.analysis.measure` imports torch; `bvit.analysis.plots` matplotlib).
"""
