"""DNS bytes at speed: the response parser, the reply renderer, and the one dnspython patch they
need (DESIGN.md, "Speed").
"""
