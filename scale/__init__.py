"""Scale out on Ray Serve: the Litestar app as a Ray Serve deployment, one engine per replica.

``toolkit serve --ray`` (see :func:`toolkit.scale.ray_serve.serve_on_ray`) starts (or joins) a Ray
cluster, puts Ray Serve's HTTP proxy in front and runs N replicas of the same app that plain
``toolkit serve`` runs, each with its own engine. Nothing here imports ``ray`` at import time:
``options``, ``metrics_merge`` and ``proxy_errors`` are plain Python; only ``ray_serve`` needs the
``toolkit[ray]`` extra, and it is imported only when ``--ray`` is given.

Layer: ``scale`` may import server, runtime, artifact and recipes (tests/test_architecture.py).
"""
