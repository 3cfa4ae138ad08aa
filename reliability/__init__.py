"""The reliability campaign: every way a user's files can be damaged, raced, killed or forged,
run against every installed backend, each case in its own forked process under a timeout and a
memory cap, with every outcome classified.

``python -m reliability`` (``nox -s reliability``) runs the full campaign and regenerates the table
in ``docs/reliability.md``; ``--quick`` runs a small deterministic sample of every case family
(the CI gate, see ``tests/test_reliability_quick.py``). ``reliability.fuzz`` holds the
coverage-guided fuzz targets (atheris) of the readers.

Outcomes (:class:`reliability.runner.Outcome`):

- ``ok``: the operation succeeded and served exactly the reference data;
- ``typed``: it failed with a :class:`jasper.errors.JasperError` (the wanted outcome for bad input);
- ``untyped``: it failed with any other exception;
- ``crash``: the process died from a signal or exited nonzero without a Python traceback;
- ``hang``: it ran past its timeout (stretched by the load: ``runner.load_factor``);
- ``silent-wrong``: it succeeded but served data differing from the reference where a checksum or
  a structural rule of the data model could have caught it;
- ``undetected``: it succeeded with data differing from the reference in a way no rule the mode
  applies can see (e.g. a flipped mantissa bit under preload, which does not verify checksums);
  reported, not a goal failure;
- ``lost``: after a kill, full disk or race, neither the previous dataset nor the new one is
  intact (or a source was damaged);
- ``leftover``: a dead writer's scratch directory survived the next write;
- ``canary``: a malicious pickle ran code (its canary file appeared).
"""
