"""Errors with the HTTP status they map to: RequestError is the client's (4xx), ServiceUnavailable a
retryable 503; anything else the server answers is a 500 bug."""

from __future__ import annotations


class RequestError(ValueError):
    """A client error: bad input, never a server fault."""

    status_code = 400


class UnsupportedMediaType(RequestError):
    """The content type is not one the endpoint accepts."""

    status_code = 415


class PayloadTooLarge(RequestError):
    """The body or the decoded image exceeds the configured limits."""

    status_code = 413


class UnprocessableImage(RequestError):
    """The payload is of an accepted type but holds no usable image."""

    status_code = 422


class NotAcceptable(RequestError):
    """The client asked for a response type the endpoint cannot produce."""

    status_code = 406


class ServiceUnavailable(Exception):
    """The server cannot answer this request now (shutting down, or capture cannot keep up); retry."""

    status_code = 503


class ShuttingDown(ServiceUnavailable):
    """Work abandoned because the server is stopping."""
