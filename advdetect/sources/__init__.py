"""What an audit is pointed at: model specs (:mod:`.models`), data specs (:mod:`.datasets`) and the embedded
default model and digits (:mod:`.embedded`).
"""
