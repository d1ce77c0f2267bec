"""Inference: the SavedModel export (preprocessing inside the graph), the predictor of
CT studies and image folders with its writers, and the TF Serving client.
"""
