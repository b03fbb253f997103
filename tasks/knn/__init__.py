"""Differentiable kNN, its CNN baseline and classical kNN."""
