"""cxr: NIH ChestX-ray14 to a monitored chest X-ray classifier in production.

A plain library: data ingest and caching (`cxr.data`), model, training, evaluation, serving, deployment and
monitoring. Metaflow flows in `flows/` orchestrate it; nothing here needs Metaflow or AWS to import.
"""

__version__ = "0.1.0"
