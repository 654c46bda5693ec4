"""What to run: audit options (:mod:`.options`) and suites (:mod:`.suite`, built-in TOMLs in ``suites/``).
"""
