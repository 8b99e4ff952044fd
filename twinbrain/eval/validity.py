"""Old home of the twin-validity statistics, now :mod:`twinbrain.scoring.validity`.

Kept only for ``twinbrain/twin/cli.py`` (``offdiag_pearson``), which imports this path; once that file
imports :mod:`twinbrain.scoring.validity` this module goes.
"""
from twinbrain.scoring.validity import offdiag_pearson  # noqa: F401
