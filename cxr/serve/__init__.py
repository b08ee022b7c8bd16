"""Serving: the SageMaker container contract (`/ping`, `/invocations`) with dynamic batching, data capture,
Prometheus metrics and A/B traffic splitting. One small module per concern: errors, decoder, dicom,
predictor, trust (input gate, uncertainty), explain, batcher, capture, metrics, router, headers, resolve,
app; `gateway` splits traffic between SageMaker endpoints (A/B on serverless)."""
