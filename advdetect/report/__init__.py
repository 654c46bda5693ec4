"""The report stage: results.json, report.html and report.pdf from a run folder. Torch-free.
"""
