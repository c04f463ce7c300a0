"""`omnifuse tune`: hyperparameter search with Optuna over omnifuse's training settings, built
on the Python API: every trial is an `api.train` or `api.cv` call.

    space.py    the search space (space.yaml; `omnifuse tune init` writes the default)
    request.py  TuneRequest, the tune folder's file names, the held-out test split
    study.py    the Optuna study shared by processes: exactly N trials, heartbeats, requeues
    run.py      the trials and the refit; nested.py the nested cross-validation
    outputs.py  trials.csv, best.json/best.yaml, meta.csv; TuneResult
    front.py    ``tune()``, re-exported as ``omnifuse_cli.tune``

Nothing is imported here, so `omnifuse tune init` (space.py) does not load torch.
"""
