"""Monitoring: baselines from training, capture reading, drift and performance checks, reports, alerts."""
