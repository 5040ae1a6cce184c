"""Analyses of trained models: `measure.py` (pure measurements per step) and `plots.py` (their figures).

Import the module you need (`bvit.analysis.measure` imports torch; `bvit.analysis.plots` matplotlib).
"""
