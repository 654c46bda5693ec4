"""Entry points: the ``advdetect`` command (:mod:`.commands`), the pytest plugin (:mod:`.pytest_plugin`) and the
developer benchmarks (:mod:`.bench`, :mod:`.scaling`). Nothing else imports this package.
"""
