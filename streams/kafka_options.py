"""Kafka client options, built in one place from Settings: the aiokafka
keyword arguments every producer, consumer and admin client of the project
uses (worker, CLI, demo, benchmarks, tests), and the faust credentials of the
worker's app. Both carry the same TLS and SASL settings, so a secured broker
needs configuring once (``EFFICACY_SECURITY_PROTOCOL`` and friends)."""

from __future__ import annotations

from typing import Any

from streams.settings import Settings


def aiokafka_options(target: Settings | str) -> dict[str, Any]:
    """Connection options for aiokafka's producer, consumer and admin client.
    ``target``: the settings, or a bootstrap address (a plaintext broker, as
    the tests' local one)."""
    settings = target if isinstance(target, Settings) else Settings(bootstrap_servers=target)
    options: dict[str, Any] = {"bootstrap_servers": settings.bootstrap_servers}
    if settings.security_protocol != "PLAINTEXT":
        options["security_protocol"] = settings.security_protocol
        options["ssl_context"] = settings.ssl_context()
    if settings.security_protocol.startswith("SASL"):
        options["sasl_mechanism"] = settings.sasl_mechanism
        options["sasl_plain_username"] = settings.sasl_username
        options["sasl_plain_password"] = (
            settings.sasl_password.get_secret_value() if settings.sasl_password else None
        )
    return options


def faust_credentials(settings: Settings):
    """faust credentials for SASL / SSL, or None for PLAINTEXT."""
    import faust
    from faust.types.auth import SASLMechanism

    context = settings.ssl_context()
    if settings.security_protocol.startswith("SASL"):
        assert settings.sasl_username and settings.sasl_password  # validated by Settings
        return faust.SASLCredentials(
            username=settings.sasl_username,
            password=settings.sasl_password.get_secret_value(),
            ssl_context=context,
            mechanism=SASLMechanism(settings.sasl_mechanism),
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None
