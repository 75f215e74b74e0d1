"""Serving, in one package, on one contract (``contract``: tensor names, requests, the model's description).

- ``ipiqa serve``: ``commands`` (the click command), ``server`` (options, the two PyTriton models, readiness, the
  signal loop), ``handler`` (a batch of requests through the runtime's row rules), ``environment`` (what
  PyTriton's python stub needs of this process).
- ``ipiqa score --server``: ``client`` (``RemoteScorer``: a local run's rows, scored remotely; connection
  failures retried, then the run stops resumable).
- The NGC repository (``ipiqa-export --triton``): ``triton_model`` (its python preprocessing model) and
  ``triton_client`` (one image from the command line; also talks to ``ipiqa serve``).
"""
