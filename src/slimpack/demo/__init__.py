"""`slimpack demo`: the whole pipeline end to end on text every Python installation ships.

No network and nothing outside the Python installation. Builds a small corpus in SlimPajama's
layout from real human-written text (the pydoc topic help, standard-library docstrings and source,
the Python licence), labelled by what it really is, tokenizes it with 2 workers, checks the shard
invariants, and goes on through the later stages as they exist.

`corpus.py` builds the corpus (no torch), `steps.py` runs the stages, `cli.py` registers the command.
"""
