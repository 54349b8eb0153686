"""
The wire formats: sans-IO codecs fed bytes and returning bytes or events.

Nothing in this package imports Twisted.
"""
