"""``dist-cosface clean``: label noise, duplicate identities and train/evaluation overlap found
with a trained run across ranks, and a cleaned shard set written (see docs/cleaning.md).

Layout: config.py (CleanConfig), source.py (the shard set and its sample numbering), embed.py
(every sample embedded, each rank its shards), centers.py (this rank's class centers from the
checkpoint), samples.py (samples against their class center on the owning rank), search.py
(neighbours among sharded centers on ``eval/topk.py``), evalsets.py (evaluation identities),
comm.py (its collectives), unionfind.py, run.py (the phases), writer.py (the new shards),
outputs.py + report.py (rank 0's files), cli.py (the subcommand).
"""
