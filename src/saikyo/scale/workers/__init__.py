"""Several processes serving one app on one port (`saikyo serve --workers N`): the `supervisor`, each
`worker`, the `board` they share, model `control` applied by every worker, and `shared_metrics` (one
/metrics over several processes, also Ray's)."""
