"""
Services: what owns lifecycle and state (listeners, reload, the state directory).
"""
