"""Video stream processing:
camera streams and clips turned into detections, keyframes and clips.
"""
