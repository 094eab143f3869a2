"""Plant identification:
pl@ntNet-compatible plant identification over an observatory's own flora.
"""
