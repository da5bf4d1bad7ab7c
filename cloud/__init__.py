"""tandemspec.cloud: the verifier that holds the target model and judges edges' drafts.

Layout (one role per module)::

    config     CloudConfig, the one frozen configuration of a verifier
    target     TargetModel: loading, per-session KV caches, padded batched forward
    verify     judging a frame from the target's logits (greedy / rejection sampling)
    session    handshake and frame validation, session state and rollback, admission
    scheduler  BatchScheduler: time-window batching of steps across sessions
    wire       raw-bytes parsing of edge frames (bad input -> INVALID_ARGUMENT)
    service    the Verifier servicer: Info and the Decode session loop
    security   bearer-token interceptor, TLS credentials
    metrics    Prometheus metrics in a per-server registry
    server     start_server / serve_in_thread (the API tests and the demo use)
    commands   ``tandem cloud serve``

Importing this package does not import torch; ``target`` and ``server`` do.
"""
