"""Request errors with the HTTP status they map to; anything else the server answers is a 5xx bug."""

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
