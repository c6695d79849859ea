"""E-mail and IP redaction."""

from engine.data.curation.pii import EMAIL_REPLACEMENTS, IP_REPLACEMENTS, PIIRedactor


def test_emails_and_public_ips_are_replaced_in_turn():
    text = "Mail jane.doe@mail.example.net or bob+x@corp.io, server 8.8.8.8 and 1.1.1.1, LAN 192.168.1.20."
    out, why = PIIRedactor().process(text)
    assert why is None
    assert out == (
        f"Mail {EMAIL_REPLACEMENTS[0]} or {EMAIL_REPLACEMENTS[1]}, server {IP_REPLACEMENTS[0]} and "
        f"{IP_REPLACEMENTS[1]}, LAN 192.168.1.20."
    )


def test_private_and_invalid_addresses_stay_unless_asked():
    text = "loopback 127.0.0.1, private 10.0.0.7, not an address 999.1.1.1, version 1.2.3"
    assert PIIRedactor().process(text)[0] == text
    out = PIIRedactor(only_public_ips=False).process(text)[0]
    assert "127.0.0.1" not in out and "10.0.0.7" not in out and "999.1.1.1" in out
    assert PIIRedactor().process("at 8.8.4.4. Or 1.2.3.4.5")[0] == f"at {IP_REPLACEMENTS[0]}. Or 1.2.3.4.5"


def test_switches_and_custom_replacements():
    text = "a@b.com at 8.8.8.8"
    assert PIIRedactor(remove_emails=False).process(text)[0] == f"a@b.com at {IP_REPLACEMENTS[0]}"
    assert PIIRedactor(remove_ips=False, email_replacements=["<email>"]).process(text)[0] == "<email> at 8.8.8.8"
