"""Offline preparation: what runs once, before training, and never in a loader worker.

* :mod:`.encode`: ``tsmtrain prepare``: re-encode and verify every video of the lists (ffmpeg),
  array tasks (``--shard I/N``), the merge into list files and ``manifest.jsonl``
* :mod:`.journal`: the append-only journals that make every array task resumable
* :mod:`.tar_writer`: ``prepare --shards``: the prepared videos packed into indexed tar shards
* :mod:`.flow_files`: ``prepare --flow``: each video's optical flow stored beside it
* :mod:`.plan`: ``prepare --plan``: trial encodings measured to pick the GOP and short side
* :mod:`.synthetic`, :mod:`.arrow_of_time`: the rendered datasets (demo, study, multi-label
  demo) and the arrow-of-time dataset cut from real clips
* :mod:`.datasets`: those datasets built by name (``data.generate``)

The loader reads what this package writes through :mod:`tsmtrain.data.manifest` and
:mod:`tsmtrain.data.readers`; nothing in :mod:`tsmtrain.data` imports this package.
"""
