"""Small programs that honour the job contract, standing in for medforge-train/medforge-merge in
the operator's cluster tests. Their behaviour is steered by the task name (fail-*, corrupt-*,
regress-*), so that tests can provoke each failure path."""
