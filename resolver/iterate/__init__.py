"""The iterator: QNAME-minimising iterative resolution from the root (DESIGN.md, "Iterative mode").
"""
