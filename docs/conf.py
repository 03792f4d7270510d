"""Sphinx configuration of the aiida-mlworkbench documentation (MyST Markdown pages, API from docstrings)."""

import aiida_mlworkbench

project = 'aiida-mlworkbench'
author = 'The aiida-mlworkbench developers'
copyright = '2026, The aiida-mlworkbench developers'
release = aiida_mlworkbench.__version__
version = release

extensions = [
    'myst_parser',
    'sphinx.ext.autodoc',
    'sphinx.ext.napoleon',
    'sphinx.ext.viewcode',
]
source_suffix = {'.md': 'markdown', '.rst': 'restructuredtext'}
myst_enable_extensions = ['colon_fence', 'deflist']
myst_heading_anchors = 3
exclude_patterns = ['_build']

autodoc_default_options = {'members': True, 'member-order': 'bysource', 'show-inheritance': True}
autodoc_typehints = 'description'
autodoc_typehints_format = 'short'


html_theme = 'furo'
html_title = 'aiida-mlworkbench'
