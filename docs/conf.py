"""Sphinx configuration for mtproxy-tw."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "mtproxy-tw"
author = "mtproxy-tw contributors"
copyright = "2026, mtproxy-tw contributors"
extensions = ["sphinx.ext.autodoc"]
autodoc_typehints = "none"
autodoc_member_order = "bysource"
exclude_patterns = ["_build"]
html_theme = "alabaster"
nitpicky = False
