"""Results a person can look at or keep: ``ipiqa report`` (one offline HTML page) and ``ipiqa select`` (best
of N, thresholds; a manifest and/or new WebDataset shards), both reading what ``ipiqa score`` wrote, streamed.

``read``: one scores file as rows, by the output codecs' own layouts. ``sets``: a scores set (one file, an
``--output-dir`` folder, a list or pattern of score files) read as one. ``stats``: one-pass accumulators
(histograms, bounded heaps, reservoir samples, per-prompt spread). ``collect``: the report's two passes.
``thumbs``: small JPEG data URIs. ``runinfo``: what made the scores (the run records). ``svg`` and ``page``:
the page. ``build``: ``write_report``. ``select``: the chosen rows. ``to_shards``: their samples as new
shards. ``commands``: the click commands. Torch-free, like the rest of the runtime; only public functions of
the other modules are called.
"""
