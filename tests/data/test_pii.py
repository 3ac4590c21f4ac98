"""PII / secret redaction: planted secrets of each kind, no false redactions on clean code."""

from __future__ import annotations

import inspect
import json
import textwrap

import pytest

from graphtune.data.config import PIIConfig
from graphtune.data.pii import PIIRedactor, shannon_entropy

PLANTED = {
    "aws_access_key": ('AWS_ACCESS_KEY_ID = "AKIAQ3EGRTW7XPL5MZ2K"\n', "KEY"),
    "aws_secret": ('aws_secret_access_key = "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"\n', "KEY"),
    "github": ('GITHUB_TOKEN = "ghp_4fT9kLm2Qz8RvX1bN7cW3yH6jP0sD5aE2gU8"\n', "KEY"),
    "slack": ('SLACK = "xoxb-284617293047-1938475610294-Zq8WnR4tLp2VxK9mC3bJ7hFd"\n', "KEY"),
    "stripe": ('stripe.api_key = "sk_live_9hT2mQ4xR7vN1cL8pK3wZ6bY"\n', "KEY"),
    "jwt": ('token = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"\n', "KEY"),
    "generic_api_key": ('API_KEY = "q8Zr2LmX9vT4nB7kW1pC5sD3fG6hJ0yE"\n', "KEY"),
    "password": ('db_password = "Xk9#mP2$vL7qR4!t"\n', "PASSWORD"),
    "basic_auth": ('DATABASE_URL = "postgres://admin:Hq7zW2nR9xK4@db.example.org:5432/app"\n', "PASSWORD"),
    "private_key": ("KEY = '''-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEAx2Qv7yJ9kZ3mW8pR5tL1nB4cX6vF0hG2jK9sD7aE3qY\nT5uI8oP1lK4jH7gF2dS9aZ6xC3vB0nM5qW8eR1tY4uI7oP2lK5jH8gF3dS0a\n-----END RSA PRIVATE KEY-----'''\n", "KEY"),
    "email": ('MAINTAINER = "jane.doe@acme-mail.com"\n', "EMAIL"),
    "ipv4": ('SERVER = "93.184.216.34"\n', "IP_ADDRESS"),
    "ipv6": ('SERVER6 = "2606:2800:220:1:248:1893:25c8:1946"\n', "IP_ADDRESS"),
}


@pytest.fixture(scope="module")
def redactor() -> PIIRedactor:
    return PIIRedactor(PIIConfig())


@pytest.mark.parametrize("name", sorted(PLANTED))
def test_each_planted_kind_is_redacted(redactor, name):
    line, kind = PLANTED[name]
    out, counts = redactor.redact(line, "settings.py")
    assert counts.get(kind, 0) >= 1, (name, out, counts)
    assert f"<{kind}>" in out


def test_redaction_keeps_structure(redactor):
    src = "".join(line for line, _ in PLANTED.values())
    out, counts = redactor.redact(src, "settings.py")
    assert out.count("\n") == src.count("\n") - 1  # the two key lines became one placeholder
    assert "-----BEGIN RSA PRIVATE KEY-----\n<KEY>\n-----END RSA PRIVATE KEY-----" in out
    assert "AKIAQ3EGRTW7XPL5MZ2K" not in out and "Hq7zW2nR9xK4" not in out and "jane.doe" not in out
    assert "postgres://admin:<PASSWORD>@db.example.org" in out
    assert sum(counts.values()) >= len(PLANTED)
    # deterministic
    assert redactor.redact(src, "settings.py") == (out, counts)


@pytest.mark.parametrize("text", [
    'HOST = "192.168.1.20"\n', 'LOOP = "127.0.0.1"\n', 'NET = "10.0.0.1"\n', '__version__ = "1.2.3.4"\n',
    'release = "version 10.20.30.40"\n', 'OID = "1.3.6.1.4.1.311"\n', 'DNS = "8.8.8.8"\n', 'x = a[::2]\n',
    'password = get_password()\n', 'secret = settings.SECRET_KEY\n', 'password = "changeme"\n',
    'digest = "d41d8cd98f00b204e9800998ecf8427e"  # md5 hash\n', 'API_KEY = os.environ["API_KEY"]\n',
    'token = "${API_TOKEN}"\n', 'm = x@y\n',
])
def test_non_secrets_are_kept(redactor, text):
    out, counts = redactor.redact(text, "app.py")
    assert out == text and counts == {}


def test_clean_stdlib_code_has_no_key_or_password_redactions(redactor):
    for mod in (json.decoder, json.encoder, textwrap, inspect):
        src = inspect.getsource(mod)
        _, counts = redactor.redact(src, mod.__name__ + ".py")
        assert counts.get("KEY", 0) == 0 and counts.get("PASSWORD", 0) == 0, (mod.__name__, counts)


def test_switches(redactor):
    line = 'MAINTAINER = "jane.doe@acme-mail.com"  # 93.184.216.34\n'
    assert PIIRedactor(PIIConfig(emails=False)).redact(line)[1] == {"IP_ADDRESS": 1}
    assert PIIRedactor(PIIConfig(enabled=False)).redact(line) == (line, {})


def test_entropy():
    assert shannon_entropy("aaaa") == 0.0
    assert shannon_entropy("abcd") == 2.0
