"""MOBIS mobile app backend:
accounts, app configuration and offline-first sync for mobile observatory apps.
"""
