"""The report stage: results.json, report.html and report.pdf from a run folder. Torch-free.

``document`` reads the run folder and says what the report shows (``results.json``, the findings,
the tables, one view); ``figures`` draws its figures with matplotlib's object-oriented API (no
pyplot, no global state); ``html`` and ``pdf`` lay the view out.
"""
