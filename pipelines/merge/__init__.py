"""Model merging: mergekit runs (merge.py) and the in-memory candidate merge of the
evolutionary search (inmemory.py); their memory plans are in pipelines/plan/."""
