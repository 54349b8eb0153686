"""
Domain fronting: the fronted sites' measured TLS answers.
"""
