"""
mtproxy-tw: a Telegram MTProto proxy built on Twisted.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
