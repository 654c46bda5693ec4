"""The run folder: its layout, records, storage, history, checks and metrics. Torch-free: every stage reads and
writes a run through this package, and nothing here imports torch or another advdetect package but
:mod:`advdetect.errors`.
"""
