"""What ``router serve`` reads: ``ServeConfig`` (the checkpoints, the default rule, where to
listen), ``LimitsConfig`` (the most work one request may ask for), both validated at load with
errors that name the key, and loading the verified ensemble the config names."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from comms.errors import ConfigError
from comms.tls import TLSConfig

if TYPE_CHECKING:
    from router.checkpoint import LoadedEnsemble


@dataclasses.dataclass
class LimitsConfig:
    max_new_bytes: int = 1024  # largest max_bytes a generation may ask for
    max_prompt_bytes: int = 4096  # longest prompt (UTF-8 bytes)
    max_samples: int = 64  # largest n of a sampling request
    max_steps: int = 200  # most Euler steps of a sampling request
    request_timeout: float = 120.0  # seconds before a request is answered 504
    max_body_bytes: int = 65536  # larger request bodies get 413

    def validate(self) -> None:
        for key in ("max_new_bytes", "max_prompt_bytes", "max_samples", "max_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be at least 1, got {getattr(self, key)}")
        if not self.request_timeout > 0:
            raise ConfigError(f"request_timeout: must be > 0, got {self.request_timeout}")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"max_body_bytes: must be at least 1024, got {self.max_body_bytes}")


@dataclasses.dataclass
class ServeConfig:
    listen: str = "127.0.0.1:8480"  # host:port; port 0 picks a free one
    experts: list[str] = dataclasses.field(default_factory=list)  # expert checkpoint dirs
    router: str = ""  # router checkpoint dir (from `router train`)
    partition: str = ""  # or: a saved text partition, served with the c-BTM router
    cbtm_temperature: float = 0.1  # T of the c-BTM router weights softmax(-d^2 / T)
    rule: str = "top1"  # default rule: full, top1, top_k:K, threshold:TAU
    device: str = "cpu"  # where the experts and router run
    roster: str = ""  # optional roster JSON: checkpoint signers must be listed in it
    trusted_keys: list[str] = dataclasses.field(default_factory=list)  # or hex public keys
    http_token: str = ""  # bearer token of /v1/*; "": $ARCHIPELAGO_HTTP_TOKEN, else open
    http_token_metrics: bool = False  # the token also guards /metrics (/healthz stays open)
    limits: LimitsConfig = dataclasses.field(default_factory=LimitsConfig)
    # [tls] cert + key: serve HTTPS; with mutual (and ca) clients must present a certificate
    # the CA signed (router.Client(url, ca=..., cert=..., key=...)). Empty: plain HTTP
    tls: TLSConfig = dataclasses.field(default_factory=TLSConfig)

    def validate(self) -> None:
        if self.tls.enabled:
            self.tls.require("cert", who="router serve serves HTTPS with its certificate and key")
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ConfigError(f"listen: expected HOST:PORT, got {self.listen!r}")
        if not self.experts:
            raise ConfigError("experts: list at least one expert checkpoint directory")
        if bool(self.router) == bool(self.partition):
            raise ConfigError(
                "router: give exactly one of 'router' (a router checkpoint) or 'partition' "
                "(a saved text partition for the c-BTM router)"
            )
        from router.rules import parse_rule

        try:
            parse_rule(self.rule)
        except ValueError as e:
            raise ConfigError(f"rule: {e}") from e
        if not self.cbtm_temperature > 0:
            raise ConfigError(f"cbtm_temperature: must be > 0, got {self.cbtm_temperature}")

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host, int(port)


# --- loading the ensemble -------------------------------------------------------------------


def load_served_ensemble(config: ServeConfig) -> LoadedEnsemble:
    """Verify and load every checkpoint ``config`` names (``router.checkpoint.load_ensemble``)."""
    from comms.identity import Roster
    from router.checkpoint import load_ensemble

    return load_ensemble(
        config.experts,
        router=config.router,
        partition=config.partition,
        rule=config.rule,
        device=config.device,
        roster=Roster.load(config.roster) if config.roster else None,
        trusted_keys=list(config.trusted_keys) or None,
        cbtm_temperature=config.cbtm_temperature,
    )
