"""vLLM 0.32 integration: the ViSpec draft as a vLLM model, its proposer, and the paged draft attention.

Modules here import vLLM; the rest of the package (reference draft, factory, training) does not.
"""
