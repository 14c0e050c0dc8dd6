"""`medforge`: the command line of hospitals and platform teams (models in and out, status of
contributions and composites, the local cluster)."""
