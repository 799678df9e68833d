"""Kafka client options, built in one place from Settings: the aiokafka
keyword arguments every producer, consumer and admin client of the project
uses (worker, CLI, demo, benchmarks, tests), and the faust credentials of the
worker's app. Both carry the same TLS and SASL settings, so a secured broker
needs configuring once (``EFFICACY_SECURITY_PROTOCOL`` and friends)."""

from __future__ import annotations

import contextlib
import ssl
from typing import Any

from streams.settings import Settings


class KafkaAccessError(RuntimeError):
    """The broker refused this client: wrong credentials, an unsupported SASL
    mechanism or a certificate the client does not trust. The message names the
    settings to check; retrying does not help."""


def plaintext(bootstrap_servers: str) -> Settings:
    """Settings of a plaintext broker at ``bootstrap_servers``."""
    return Settings(bootstrap_servers=bootstrap_servers, security_protocol="PLAINTEXT")


def aiokafka_options(target: Settings | str) -> dict[str, Any]:
    """Connection options for aiokafka's producer, consumer and admin client.
    ``target``: the settings, or a bootstrap address (a plaintext broker, as
    the tests' local one, whatever EFFICACY_SECURITY_PROTOCOL says)."""
    settings = target if isinstance(target, Settings) else plaintext(target)
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


async def refusal(settings: Settings) -> str | None:
    """Why the brokers refuse a connection made with ``settings`` (authentication
    or TLS), as a message naming the settings to check; None when they accept it
    or cannot be reached at all (not a refusal: the broker may be starting)."""
    from aiokafka.conn import create_conn
    from aiokafka.errors import (
        AuthenticationFailedError,
        KafkaError,
        SaslAuthenticationFailed,
        UnsupportedSaslMechanismError,
    )

    options = aiokafka_options(settings)
    connection = {k: v for k, v in options.items() if k != "bootstrap_servers"}
    for address in settings.bootstrap_servers.split(","):
        host, _, port = address.strip().rpartition(":")
        try:
            conn = await create_conn(host, int(port), request_timeout_ms=10_000, **connection)
        except (SaslAuthenticationFailed, AuthenticationFailedError) as error:
            return (
                f"Kafka authentication failed at {address} for SASL user "
                f"{settings.sasl_username!r} ({settings.sasl_mechanism}): {error}. Check "
                "EFFICACY_SASL_USERNAME and EFFICACY_SASL_PASSWORD (and EFFICACY_SASL_MECHANISM)"
            )
        except UnsupportedSaslMechanismError as error:
            return (
                f"the Kafka broker at {address} does not accept SASL mechanism "
                f"{settings.sasl_mechanism}: {error}. Check EFFICACY_SASL_MECHANISM"
            )
        except ssl.SSLCertVerificationError as error:
            return (
                f"the Kafka broker's certificate at {address} is not trusted: {error.verify_message}. "
                "Check EFFICACY_SSL_CAFILE (the CA that signs the broker's certificate)"
            )
        except ssl.SSLError as error:
            return (
                f"TLS with the Kafka broker at {address} failed: {error}. Check "
                "EFFICACY_SECURITY_PROTOCOL (does the listener speak TLS?) and EFFICACY_SSL_*"
            )
        except (OSError, KafkaError, TimeoutError, ValueError):
            continue
        conn.close()
    return None


async def start_client(client: Any, settings: Settings | str) -> None:
    """``await client.start()`` for an aiokafka producer, consumer or admin client
    built from ``aiokafka_options(settings)``; when it cannot connect because the
    broker refuses it, raise KafkaAccessError saying why instead of aiokafka's
    "Unable to bootstrap" (a wrong password would otherwise look like a broker
    that is down)."""
    from aiokafka.errors import KafkaConnectionError

    try:
        await client.start()
    except KafkaConnectionError as error:
        target = settings if isinstance(settings, Settings) else plaintext(settings)
        if target.security_protocol != "PLAINTEXT" and (why := await refusal(target)):
            # final: close the client (no "Unclosed AIOKafka..." warning); after a
            # plain connection error it stays open for the caller to start() again
            with contextlib.suppress(Exception):
                await (client.stop() if hasattr(client, "stop") else client.close())
            raise KafkaAccessError(why) from error
        raise
