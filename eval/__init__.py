"""The evaluations of the paper and the ones users ask for, over the outputs of the steps.

Each module is a script (``python eval/<name>.py --help``) with ``parse_args(argv)`` and
``main(args)``; the metric code lives in ``utils/evaluation/``.
Import them as ``from eval import generation`` (the folder is a package for the tests; the
name shadows no module, only the builtin function ``eval`` where ``eval`` itself is imported).
"""
