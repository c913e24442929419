"""The runtime (mechanism): what runs when a model generates.

``store`` (slow tier: safetensors files), ``residency`` (the residency core: which expert is where),
``cache`` (fast-tier slots driven by the core), ``mover`` / ``cuda_mover`` (copies), ``engine`` (the
offloaded experts module and its engine), ``loader`` (``from_pretrained``), ``adapters``
(per-architecture facts), ``policies`` (eviction), ``config`` and ``stats``.
"""
