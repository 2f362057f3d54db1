"""Defaults the command line shows in its help, kept in a module that imports nothing (the CLI's help must not
import torch or OpenCV)."""

DEFAULT_FLAG_SPEARMAN = 0.5
"""`camloc sanity --flag-spearman`: a method whose mean Spearman correlation with the trained maps, with the whole
image tower re-drawn, is at least this is flagged."""
