"""Redundancy codebooks: the project's file format (``store``) and, later, the builder."""
