"""Serving: the SageMaker container contract (`/ping`, `/invocations`) with dynamic batching, data capture,
Prometheus metrics and A/B traffic splitting. One small module per concern: errors, decoder, predictor,
explain, batcher, capture, metrics, router, app."""
