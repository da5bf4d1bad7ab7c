"""The edge: drafter on ONNX Runtime, hybrid decoding loop, gRPC client, local API, device log.

Modules: ``bundle`` (edge bundle manifest), ``drafter`` (:class:`OnnxDrafter`),
``proposal`` (the drafter's exact truncated q), ``features`` (gate features),
``client`` (verifier client, backoff), ``decoder`` (:class:`HybridDecoder`), ``stats``,
``tokenizer``, ``devicelog`` (:class:`DeviceLog`), ``runtime`` (:class:`EdgeConfig`),
``api`` (OpenAI-compatible HTTP API), ``commands`` and ``demo`` (CLI verbs).
Nothing here imports torch, transformers or ``tandemspec.cloud``.
"""
