"""Reporting: figures (overlays, ROC, learning curves, severity boxplots) and the
Markdown/HTML report of an evaluation. Uses only `tfcovseg.evaluation`'s rule constants.
"""
