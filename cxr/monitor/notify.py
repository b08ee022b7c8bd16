"""Alerts: log/stdout by default, an HTTP webhook or an SNS topic when configured."""

from __future__ import annotations

import json
import logging
import urllib.request
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Notifier(Protocol):
    """Sends one alert."""

    def send(self, subject: str, body: dict[str, Any]) -> str:
        """Deliver; returns a receipt (message id, HTTP status, ...)."""
        ...


class LogNotifier:
    """Writes the alert to the log (and so to the Metaflow task output)."""

    def send(self, subject: str, body: dict[str, Any]) -> str:
        log.warning("%s\n%s", subject, json.dumps(body, indent=1, default=str))
        print(f"ALERT: {subject}")
        return "logged"


class WebhookNotifier:
    """POSTs the alert as JSON (Slack/Teams/PagerDuty-style incoming webhooks)."""

    def __init__(self, url: str, timeout: float = 10.0):
        if not url.startswith(("https://", "http://")):
            raise ValueError(f"webhook URL must be http(s): {url!r}")
        self.url, self.timeout = url, timeout

    def send(self, subject: str, body: dict[str, Any]) -> str:
        payload = json.dumps({"text": subject, "alert": body}, default=str).encode()
        request = urllib.request.Request(self.url, payload, {"Content-Type": "application/json"})  # noqa: S310
        with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310  # nosec B310
            return str(response.status)


class SNSNotifier:
    """Publishes to an SNS topic (email, SMS, Lambda, ... subscribers)."""

    def __init__(self, topic_arn: str):
        self.topic_arn = topic_arn

    def send(self, subject: str, body: dict[str, Any]) -> str:
        import boto3

        response = boto3.client("sns").publish(
            TopicArn=self.topic_arn, Subject=subject[:100], Message=json.dumps(body, indent=1, default=str)
        )
        return str(response["MessageId"])


def make_notifier(spec: str | None) -> Notifier:
    """`log` (default), an `http(s)://` webhook URL, or an `arn:aws:sns:…` topic."""
    if not spec or spec == "log":
        return LogNotifier()
    if spec.startswith(("https://", "http://")):
        return WebhookNotifier(spec)
    if spec.startswith("arn:aws:sns:"):
        return SNSNotifier(spec)
    raise ValueError(f"unknown notifier {spec!r}: use 'log', an http(s) webhook URL or an SNS topic ARN")
