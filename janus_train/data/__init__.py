"""The data path: shards on disk -> exact per-step task mix -> packed `PackedBatch`es.

Entry point: `janus_train.data.loader.build_train_loader`; see docs/data.md. (Nothing is
imported here, so decode workers start without pulling in more than they need.)
"""
