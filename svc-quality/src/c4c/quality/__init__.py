"""Data-quality scoring:
an explainable quality score, grade and flags for every observation.
"""
