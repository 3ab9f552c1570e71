"""``aip.access.AccessPolicy``: who may connect to the hub, decided from the HTTP request alone (no socket).

The Host and Origin headers, the credential and the endpoint it opens
(``/ws`` for devices, ``/controller`` for controllers), each as a plain call
on a request's parts; what a real hub does with the verdict is in
``tests/integration/test_hub.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from aip.access import CONTROLLER_PATH, DEVICE_PATH, AccessPolicy, Refusal, host_name
from aip.credentials import CredentialError, CredentialStore, Identity, Role, check_token, digest

# -- AccessPolicy ------------------------------------------------------------------------

STORE = CredentialStore()
DEVICE_TOKEN = STORE.issue(Role.DEVICE, "dev-a", token="device-token-for-dev-a-0123456789")
CONTROLLER_TOKEN = STORE.issue(Role.CONTROLLER, "ctl", token="controller-token-0123456789abcdef")
LOOPBACK = "127.0.0.1:8765"
HOST_REFUSED = Refusal(403, "Host not allowed")
ORIGIN_REFUSED = Refusal(403, "Origin not allowed")
UNKNOWN = Refusal(401, "missing or unknown credential")


def admit(
    target: str = DEVICE_PATH,
    hosts: Sequence[str] = (LOOPBACK,),
    authorizations: Sequence[str] = (f"Bearer {DEVICE_TOKEN}",),
    origins: Sequence[str] = (),
    policy: AccessPolicy | None = None,
) -> Identity | Refusal:
    """``policy`` (by default the loopback policy over ``STORE``) on a request with these headers."""
    policy = policy if policy is not None else AccessPolicy(STORE)
    return policy.admit(target, list(hosts), list(authorizations), list(origins))


def assert_device(verdict: Identity | Refusal) -> None:
    assert isinstance(verdict, Identity), verdict
    assert verdict == STORE.identify(DEVICE_TOKEN) and verdict.role is Role.DEVICE and verdict.name == "dev-a"


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("example.org:8765", "example.org"),
        ("Example.ORG", "example.org"),
        ("[::1]:8765", "::1"),
        ("[::1]", "::1"),
        ("::1", "::1"),
        ("127.0.0.1:80", "127.0.0.1"),
        (" localhost:1 ", "localhost"),
    ],
)
def test_host_name_strips_the_port(header: str, name: str) -> None:
    assert host_name(header) == name


def test_a_device_credential_opens_the_device_endpoint() -> None:
    assert DEVICE_PATH == "/ws"
    assert_device(admit(DEVICE_PATH))


def test_a_controller_credential_opens_the_controller_endpoint() -> None:
    assert CONTROLLER_PATH == "/controller"
    identity = admit(CONTROLLER_PATH, authorizations=[f"Bearer {CONTROLLER_TOKEN}"])
    assert isinstance(identity, Identity)
    assert identity.role is Role.CONTROLLER and identity.name == "ctl" and identity.devices == ("*",)


@pytest.mark.parametrize(
    ("target", "authorization"),
    [
        (CONTROLLER_PATH, f"Bearer {DEVICE_TOKEN}"),
        (DEVICE_PATH, f"Bearer {CONTROLLER_TOKEN}"),
        (f"{CONTROLLER_PATH}?token={DEVICE_TOKEN}", None),
        (f"{DEVICE_PATH}?token={CONTROLLER_TOKEN}", None),
    ],
    ids=["device-on-controller", "controller-on-ws", "device-query-on-controller", "controller-query-on-ws"],
)
def test_a_credential_opens_only_its_own_endpoint(target: str, authorization: str | None) -> None:
    verdict = admit(target, authorizations=[authorization] if authorization else [])
    assert isinstance(verdict, Refusal) and verdict.status == 403
    assert DEVICE_TOKEN not in verdict.reason and CONTROLLER_TOKEN not in verdict.reason


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "127.0.0.1:8765", "localhost", "LOCALHOST:8765", "[::1]:8765", "[::1]", "::1"]
)
def test_loopback_hosts_are_allowed(host: str) -> None:
    assert_device(admit(hosts=[host]))


@pytest.mark.parametrize(
    "host",
    [
        "",
        "evil.example",
        "evil.example:8765",
        "127.0.0.1.evil.example",
        "localhost.evil.example:80",
        "[::2]:8765",
    ],
)
def test_other_hosts_are_refused_with_403(host: str) -> None:
    assert admit(hosts=[host]) == HOST_REFUSED
    assert admit(CONTROLLER_PATH, hosts=[host], authorizations=[f"Bearer {CONTROLLER_TOKEN}"]) == HOST_REFUSED


def test_the_host_is_checked_before_the_credential() -> None:
    assert admit(hosts=["evil.example"], authorizations=[]) == HOST_REFUSED


@pytest.mark.parametrize(
    ("target", "authorization"),
    [
        ("/ws", f"Bearer {DEVICE_TOKEN}"),
        ("/ws", f"bearer {DEVICE_TOKEN}"),
        ("/ws", f"Bearer   {DEVICE_TOKEN}  "),
        (f"/ws?token={DEVICE_TOKEN}", None),
        (f"/ws?x=1&token={DEVICE_TOKEN}", None),
        (f"/ws?token={DEVICE_TOKEN}", "Basic dXNlcjpwYXNz"),  # a proxy's own auth does not hide the query
    ],
)
def test_the_right_token_is_accepted(target: str, authorization: str | None) -> None:
    assert_device(admit(target, authorizations=[authorization] if authorization is not None else []))


@pytest.mark.parametrize(
    ("target", "authorization"),
    [
        ("/ws", None),
        ("/ws", ""),
        ("/ws", "Bearer"),
        ("/ws", "Bearer wrong"),
        ("/ws", f"Bearer {DEVICE_TOKEN}x"),
        ("/ws", f"Bearer {DEVICE_TOKEN[:-1]}"),
        ("/ws", f"Basic {DEVICE_TOKEN}"),
        ("/ws", DEVICE_TOKEN),
        ("/ws?token=wrong", None),
        ("/ws?token=", None),
        (f"/ws?tok={DEVICE_TOKEN}", None),
        (f"/ws?token={DEVICE_TOKEN}", "Bearer wrong"),  # a wrong bearer is not rescued by the query
        ("/ws", "Bearer é"),
        ("/ws", f"Bearer {digest(DEVICE_TOKEN)}"),  # the stored digest is no credential
        ("/controller", None),
        ("/controller", "Bearer wrong"),
        ("/controller?token=wrong", None),
    ],
)
def test_a_wrong_or_missing_token_is_refused_with_401(target: str, authorization: str | None) -> None:
    assert admit(target, authorizations=[authorization] if authorization is not None else []) == UNKNOWN


@pytest.mark.parametrize(
    ("target", "hosts", "authorizations", "origins"),
    [
        ("/ws", [], [f"Bearer {DEVICE_TOKEN}"], []),
        ("/ws", [LOOPBACK, LOOPBACK], [f"Bearer {DEVICE_TOKEN}"], []),
        ("/ws", [LOOPBACK, "evil.example"], [f"Bearer {DEVICE_TOKEN}"], []),
        ("/ws", ["evil.example", LOOPBACK], [f"Bearer {DEVICE_TOKEN}"], []),
        ("/ws", [LOOPBACK], [f"Bearer {DEVICE_TOKEN}", f"Bearer {DEVICE_TOKEN}"], []),
        ("/ws", [LOOPBACK], ["Bearer wrong", f"Bearer {DEVICE_TOKEN}"], []),
        ("/ws", [LOOPBACK], [f"Bearer {DEVICE_TOKEN}"], ["https://ok.example", "https://ok.example"]),
        (f"/ws?token={DEVICE_TOKEN}&token={DEVICE_TOKEN}", [LOOPBACK], [], []),
        ("//[::1", [LOOPBACK], [f"Bearer {DEVICE_TOKEN}"], []),
        ("http://[::1/ws", [LOOPBACK], [f"Bearer {DEVICE_TOKEN}"], []),
        ("//[::1", [], [], []),
    ],
    ids=[
        "no-host",
        "two-hosts",
        "good-then-bad-host",
        "bad-then-good-host",
        "two-authorizations",
        "wrong-then-right-authorization",
        "two-origins",
        "two-query-tokens",
        "malformed-path",
        "malformed-url",
        "malformed-path-and-nothing-else",
    ],
)
def test_a_malformed_request_is_refused_with_400(
    target: str, hosts: list[str], authorizations: list[str], origins: list[str]
) -> None:
    policy = AccessPolicy(STORE, origins=("https://ok.example",))
    verdict = admit(target, hosts, authorizations, origins, policy=policy)
    assert isinstance(verdict, Refusal) and verdict.status == 400, verdict
    assert DEVICE_TOKEN not in verdict.reason


@pytest.mark.parametrize("target", ["/", "/ws/", "/WS", "/controller/x", "/wss", ""])
def test_an_unknown_path_is_refused_with_404_naming_the_endpoints(target: str) -> None:
    verdict = admit(target)
    assert isinstance(verdict, Refusal) and verdict.status == 404
    assert DEVICE_PATH in verdict.reason and CONTROLLER_PATH in verdict.reason


def test_a_request_without_origin_is_not_a_browser_and_is_admitted() -> None:
    assert_device(admit(origins=[]))
    assert_device(admit(origins=[], policy=AccessPolicy(STORE, origins=("https://ok.example",))))


def test_an_allowed_origin_is_admitted() -> None:
    policy = AccessPolicy(STORE, origins=("https://ok.example", "https://other.example"))
    assert_device(admit(origins=["https://ok.example"], policy=policy))
    assert_device(admit(origins=["https://other.example"], policy=policy))


@pytest.mark.parametrize(
    "origin",
    ["https://evil.example", "null", "", "http://ok.example", "https://ok.example.evil", "https://ok.example/"],
)
def test_any_other_origin_is_refused_with_403(origin: str) -> None:
    policy = AccessPolicy(STORE, origins=("https://ok.example",))
    assert admit(origins=[origin], policy=policy) == ORIGIN_REFUSED
    assert admit(origins=[origin]) == ORIGIN_REFUSED  # with no origin allowed, no browser page gets in
    assert admit(origins=[origin], authorizations=[], policy=policy) == ORIGIN_REFUSED  # checked before the credential


def test_repr_and_str_hide_every_token_and_digest() -> None:
    policy = AccessPolicy(STORE, origins=("https://ok.example",))
    secrets = [DEVICE_TOKEN, CONTROLLER_TOKEN, digest(DEVICE_TOKEN), digest(CONTROLLER_TOKEN)]
    for text in (repr(policy), str(policy), f"{policy}", f"{policy!r}", repr([policy])):
        assert not any(secret in text for secret in secrets), text
        assert "2 credentials" in text
    assert "https://ok.example" in repr(policy)


def test_for_host_adds_the_bind_address_but_not_a_wildcard() -> None:
    assert "192.168.1.5" in AccessPolicy.for_host(STORE, "192.168.1.5").hosts
    assert_device(admit(hosts=["192.168.1.5:8765"], policy=AccessPolicy.for_host(STORE, "192.168.1.5")))
    assert admit(hosts=["192.168.1.5:8765"]) == HOST_REFUSED  # only because it was bound
    assert "hub.example" in AccessPolicy.for_host(STORE, "Hub.Example").hosts
    assert "::1" in AccessPolicy.for_host(STORE, "[::1]:8765").hosts
    for wildcard in ("0.0.0.0", "::", ""):
        policy = AccessPolicy.for_host(STORE, wildcard)
        assert policy.hosts == frozenset({"127.0.0.1", "localhost", "::1"}), wildcard
        assert admit(hosts=["0.0.0.0:8765"], policy=policy) == HOST_REFUSED


def test_for_host_keeps_extra_hosts_origins_and_the_credentials() -> None:
    policy = AccessPolicy.for_host(STORE, "127.0.0.1", extra_hosts=["Hub.Example"], origins=["https://a.example"])
    assert_device(admit(hosts=["hub.example:443"], policy=policy))
    assert_device(admit(hosts=["hub.example:443"], origins=["https://a.example"], policy=policy))
    assert policy.origins == ("https://a.example",)
    assert policy.credentials is STORE


def test_a_credential_issued_or_revoked_later_is_seen_at_once() -> None:
    store = CredentialStore()
    policy = AccessPolicy(store)
    token = store.issue(Role.DEVICE, "late")
    identity = admit(authorizations=[f"Bearer {token}"], policy=policy)
    assert isinstance(identity, Identity) and identity.name == "late"
    store.revoke(Role.DEVICE, "late")
    assert admit(authorizations=[f"Bearer {token}"], policy=policy) == UNKNOWN


@pytest.mark.parametrize("token", ["tökén", "has space", "tab\there", "newline\n", "\u00a0nbsp"])
def test_a_token_that_cannot_travel_in_a_header_is_refused(token: str) -> None:
    with pytest.raises(ValueError, match="visible ASCII"):
        check_token(token)


@pytest.mark.parametrize("token", ["", "short", "x" * 23])
def test_an_empty_or_short_token_is_refused(token: str) -> None:
    with pytest.raises(CredentialError, match="at least 24"):
        CredentialStore().issue(Role.DEVICE, "dev-a", token=token)
