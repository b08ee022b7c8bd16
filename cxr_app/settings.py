"""The application's settings: embedded defaults on one machine, production values from the environment.

| setting | environment | default |
|---|---|---|
| database_url | CXR_APP_DATABASE | sqlite:///~/.cxr/app.db (the file MonitorFlow reads reviews from) |
| endpoint_url | CXR_APP_ENDPOINT | http://127.0.0.1:8080 (a local `cxr serve`) |
| secret_key | CXR_APP_SECRET | a random key kept in ~/.cxr/app-secret (mode 0600) |
| admin_token | CXR_ADMIN_TOKEN | the token file the local endpoint also reads, ~/.cxr/admin-token |
| registry | CXR_REGISTRY | local (or the s3:// prefix of the SageMaker Model Registry's files) |
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from cxr.config import cxr_home
from cxr.registry import DEFAULT_GROUP, ModelRegistry, open_registry
from cxr.reviews import default_database_url
from cxr.serve.admin import load_admin_token, local_secret

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class AppSettings:
    """Everything `cxr app` is configured with."""

    database_url: str = field(
        default_factory=lambda: os.environ.get("CXR_APP_DATABASE") or default_database_url()
    )
    endpoint_url: str = field(
        default_factory=lambda: os.environ.get("CXR_APP_ENDPOINT", "http://127.0.0.1:8080")
    )
    secret_key: str = field(
        default_factory=lambda: os.environ.get("CXR_APP_SECRET") or local_secret(cxr_home() / "app-secret")
    )
    admin_token: str | None = field(default_factory=load_admin_token)
    registry: str = field(default_factory=lambda: os.environ.get("CXR_REGISTRY", "local"))
    group: str = DEFAULT_GROUP
    host: str = "127.0.0.1"
    port: int = 8000
    secure_cookies: bool | None = None  # default: secure unless the app listens on loopback only
    max_upload_mb: float = 64.0
    session_hours: float = 8.0

    @property
    def cookies_secure(self) -> bool:
        return self.secure_cookies if self.secure_cookies is not None else self.host not in LOOPBACK

    def open_registry(self) -> ModelRegistry:
        if self.registry.startswith("s3://"):
            return open_registry(self.group, "sagemaker", s3_prefix=self.registry)
        return open_registry(self.group)
