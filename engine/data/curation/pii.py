"""E-mail and IP address redaction, as FineWeb's last step (datatrove `PIIFormatter`).

Each match is replaced by the next string of a fixed list, in turn: e-mails by 'email@example.com' and
'firstname.lastname@example.org' (example.com/.org are reserved for examples), IPv4 addresses by datatrove's list of
addresses that did not answer pings when it was made. Only public (globally routable) IPs are replaced by default:
private, loopback and documentation addresses are not personal data. The document is never removed; the report counts
the documents changed. Unlike datatrove's, the IP pattern does not match inside longer digit runs.
"""

import ipaddress
import re
from dataclasses import dataclass, field

from engine.data.curation.steps import DocumentStep, register_step

EMAIL_RE = re.compile(
    r"\b[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*@(?:(?:[A-Za-z0-9](?:["
    r"A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?|\[(?:(?:25[0-5]|2[0-4][0-9]|["
    r"01]?[0-9][0-9]?)\.){3}(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?|[A-Za-z0-9-]*[A-Za-z0-9]:)])"
)
# datatrove's IPv4 pattern, bounded so that it cannot match inside a longer number ('999.1.1.1', '1.2.3.4.5')
IPV4_RE = re.compile(
    r"(?<![\d.])(?:(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)\.){3}(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)(?!\.?\d)"
)
EMAIL_REPLACEMENTS = ("email@example.com", "firstname.lastname@example.org")
IP_REPLACEMENTS = (
    "22.214.171.124", "126.96.36.199", "188.8.131.52", "184.108.40.206", "220.127.116.11", "18.104.22.168",
)  # fmt: skip


def is_public_ip(address: str) -> bool:
    """True for a globally routable IPv4 address (not private, loopback, link-local, reserved or documentation)."""
    try:
        return ipaddress.ip_address(address).is_global
    except ValueError:
        return False


@register_step
@dataclass
class PIIRedactor(DocumentStep):
    """Replaces e-mail addresses and (public) IPv4 addresses; replacements cycle per document, from the first."""

    name = "pii"
    remove_emails: bool = True
    remove_ips: bool = True
    only_public_ips: bool = True
    email_replacements: list[str] = field(default_factory=lambda: list(EMAIL_REPLACEMENTS))
    ip_replacements: list[str] = field(default_factory=lambda: list(IP_REPLACEMENTS))

    def process(self, text: str) -> tuple[str, str | None]:
        if self.remove_emails:
            text = _substitute(EMAIL_RE, text, self.email_replacements, None)
        if self.remove_ips:
            text = _substitute(IPV4_RE, text, self.ip_replacements, is_public_ip if self.only_public_ips else None)
        return text, None


def _substitute(pattern: re.Pattern, text: str, replacements: list[str], valid) -> str:
    turn = 0

    def replace(match: re.Match) -> str:
        nonlocal turn
        if valid is not None and not valid(match.group(0)):
            return match.group(0)
        out = replacements[turn % len(replacements)]
        turn += 1
        return out

    return pattern.sub(replace, text)
