"""Results a person can look at: ``ipiqa report`` (one offline HTML page) and ``ipiqa select`` (best of N,
thresholds), both reading the scores file ``ipiqa score`` wrote, streamed.

``read``: the scores file as rows, by the codecs' own layouts. ``stats``: one-pass accumulators (histograms,
bounded heaps, reservoir samples, per-prompt spread). ``collect``: the report's two passes. ``thumbs``: small
JPEG data URIs. ``svg`` and ``page``: the page. ``build``: ``write_report``. ``select``: the chosen rows as a
manifest. ``commands``: the click commands. Torch-free, like the rest of the runtime.
"""
