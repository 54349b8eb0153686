"""
The client side: the handshake machine, the client protocol and its legs.
"""
