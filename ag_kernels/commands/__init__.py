"""Commands wing: the command line (``python -m ag_kernels`` / ``ag-kernels``).

``main`` (the top-level parser) -> ``generate``, ``verify`` (-> ``verify_generate``),
``selfcheck`` and the toy's ``ag_kernels.toy.cli``; ``_checkout`` holds what the two verify
commands share.  Nothing below imports this wing.  Importing it loads nothing heavy: each command
imports torch when it runs, so ``--help`` and Ctrl-C stay quick.
"""
