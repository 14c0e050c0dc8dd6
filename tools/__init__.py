"""Generators of files kept in the repository (the CRD reference, the dashboard and alerts),
run by `make generate`; unit tests regenerate and compare."""
