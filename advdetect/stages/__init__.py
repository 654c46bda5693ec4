"""The straight line suite -> attack -> detect -> adaptive -> report, and what joins it: preflight validates once
before any work, each stage module reads and writes the run folder (:mod:`advdetect.run`) and imports no other
stage, :mod:`.pipeline` runs them in order, :mod:`.distributed` shares the work between torchrun processes.
"""
