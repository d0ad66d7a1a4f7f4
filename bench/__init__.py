"""Benchmarks (not tests): ``python -m bench`` runs edgevoice beside its peers."""
