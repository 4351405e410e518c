"""Model merging: the memory planner (planner.py, no torch), mergekit runs (merge.py) and
the in-memory candidate merge of the evolutionary search (inplace.py)."""
