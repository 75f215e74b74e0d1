"""``ipiqa serve`` (``server``: the Scorer as a Triton model through PyTriton), its client (``client``: ``ipiqa
score --server``) and the tensor contract both share with the written model repository (``contract``)."""
