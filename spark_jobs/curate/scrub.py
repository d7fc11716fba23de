"""The secrets scrubber: API keys, tokens, private keys, passwords in URLs, e-mail addresses
and public IPv4 addresses are replaced by a typed placeholder (``<AWS_KEY>``, ``<EMAIL>``).

Secrets are found by detect-secrets' plugins: their own regular expressions, their own checks
(a JWT must decode) and its heuristic filters (sequential strings, UUIDs, templates). Its
scanning entry points go through settings, filters and verification hooks for every line,
which is too slow for a whole code corpus; here each plugin expression runs only on the lines
where a cheap probe (a literal it needs, or a long enough token) says it can match.
"""

from __future__ import annotations

import bisect
import ipaddress
import re
from collections import Counter
from dataclasses import field
from functools import lru_cache
from typing import ClassVar, NamedTuple

from lmpipe.config import stage_config
from lmpipe.errors import ConfigError
from spark_jobs.curate.base import Doc, Filter, register

# detect-secrets plugin -> the kind of its placeholder (<KIND>) and count (scrubbed.<kind>).
KINDS = {
    "AWSKeyDetector": "AWS_KEY", "ArtifactoryDetector": "ARTIFACTORY_TOKEN",
    "AzureStorageKeyDetector": "AZURE_KEY", "BasicAuthDetector": "PASSWORD",
    "CloudantDetector": "CLOUDANT_KEY", "DiscordBotTokenDetector": "DISCORD_TOKEN",
    "GitHubTokenDetector": "GITHUB_TOKEN", "GitLabTokenDetector": "GITLAB_TOKEN",
    "IbmCloudIamDetector": "IBM_KEY", "IbmCosHmacDetector": "IBM_KEY", "JwtTokenDetector": "JWT",
    "MailchimpDetector": "MAILCHIMP_KEY", "NpmDetector": "NPM_TOKEN", "OpenAIDetector": "OPENAI_KEY",
    "PrivateKeyDetector": "PRIVATE_KEY", "PypiTokenDetector": "PYPI_TOKEN",
    "SendGridDetector": "SENDGRID_KEY", "SlackDetector": "SLACK_TOKEN", "SoftlayerDetector": "SOFTLAYER_KEY",
    "SquareOAuthDetector": "SQUARE_SECRET", "StripeDetector": "STRIPE_KEY",
    "TelegramBotTokenDetector": "TELEGRAM_TOKEN", "TwilioKeyDetector": "TWILIO_KEY",
    "IPPublicDetector": "IP_ADDRESS", "KeywordDetector": "SECRET",
    "Base64HighEntropyString": "SECRET", "HexHighEntropyString": "SECRET",
}
ENTROPY_DETECTORS = ["Base64HighEntropyString", "HexHighEntropyString"]
# Not by default: the entropy plugins and KeywordDetector flag much ordinary code, and
# IPPublicDetector is replaced by the ip_addresses rule (which also knows reserved ranges).
DEFAULT_DETECTORS = [k for k in KINDS if k not in (*ENTROPY_DETECTORS, "KeywordDetector", "IPPublicDetector")]


def _lit(*words: str) -> tuple:
    return ("lit", words)


def _any_case(word: str) -> tuple:
    return ("ilit", (word.lower(),))


def _run(k: int) -> tuple:
    return ("run", k)


# Per plugin, one probe per expression of its denylist: the expression runs only on the lines
# where its probe hits. "lit": a literal the match contains; "ilit": the same in any case; "re":
# an expression the match contains, starting with a literal (a fast search); "run": a token of
# k+ [A-Za-z0-9_-] characters. Expressions that start with a literal need no probe: the regex
# engine's own search is as fast. A plugin missing here runs its expressions on the whole text.
PROBES = {
    "AWSKeyDetector": [None, _any_case("aws")],
    "ArtifactoryDetector": [_lit("AKC"), ("re", r"AP[0-9A-F][a-zA-Z0-9]{8}")],
    "CloudantDetector": [_run(64), _run(24), _any_case("cloudant"), _any_case("cloudant")],
    "DiscordBotTokenDetector": [("re", r"\.[\w-]{6}\.[\w-]{27}")],
    "IbmCloudIamDetector": [_run(44)],
    "IbmCosHmacDetector": [_run(48)],
    "MailchimpDetector": [_lit("-us")],
    "SlackDetector": [_any_case("xox"), _any_case("hooks.slack.com")],
    "SoftlayerDetector": [_run(64), _any_case("api.softlayer.com")],
    "StripeDetector": [_lit("k_live_")],
    "TelegramBotTokenDetector": [("re", r":[0-9A-Za-z_-]{35}")],
    "IPPublicDetector": [("re", r"\.[0-9]{1,3}\.[0-9]{1,3}\.")],
}
SHORTEST_RUN = 24
TOKEN_BYTES = bytes(0x61 if chr(b).isascii() and (chr(b).isalnum() or chr(b) in "_-") else 0x20
                    for b in range(256))
DELIMITERS = " \t\r\n\"'=:"

# A PEM private key block (or a truncated one: its base64 lines), and a PuTTY key file.
KEY_BLOCK = re.compile(r"-{4,5} ?BEGIN ([A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?) ?-{4,5}"
                       r"[A-Za-z0-9+/=\s\"'\\,;:.\-]*?-{4,5} ?END \1 ?-{4,5}")
KEY_OPEN = re.compile(r"-{4,5} ?BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)? ?-{4,5}"
                      r"(?:(?:\\[nr]|[\s\"',;])*(?:[A-Z][A-Za-z-]*: [^\n]*|[A-Za-z0-9+/=]{16,}))+")
PUTTY_KEY = re.compile(r"PuTTY-User-Key-File-\d+: [^\n]*(?:\n(?:[A-Z][A-Za-z-]*: [^\n]*|[A-Za-z0-9+/=]+))*")
JWT_TAIL = re.compile(r"[A-Za-z0-9_\-+/=]*")
EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9](?:[A-Za-z0-9-]*\.)+[A-Za-z]{2,}(?![\w-])")
IPV4 = re.compile(r"[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}")
IPV4_PROBE = ("re", re.compile(r"\.[0-9]{1,3}\.[0-9]{1,3}\."))  # starts with a literal: fast
AT_PROBE = ("lit", ("@",))


@lru_cache(maxsize=1)
def plugin_classes() -> dict[str, type]:
    """detect-secrets' plugin classes by class name."""
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class

    return {cls.__name__: cls for cls in get_mapping_from_secret_type_to_class().values()}


def implausible(secret: str) -> bool:
    """detect-secrets' heuristic filters: sequences, UUIDs, templates, ``$VARS``, no letter."""
    from detect_secrets.filters import heuristic as h

    return (h.is_sequential_string(secret) or h.is_potential_uuid(secret) or h.is_templated_secret(secret)
            or h.is_prefixed_with_dollar_sign(secret) or h.is_not_alphanumeric_string(secret))


class Probe:
    """Where in one document a rule can match: the lines around its probe's hits."""

    def __init__(self, text: str):
        self.text = text
        self._runs: list[tuple[int, int]] | None = None
        self._lower: str | None = None

    def lower(self) -> str:
        if self._lower is None:
            self._lower = self.text.lower()
        return self._lower

    def runs(self) -> list[tuple[int, int]]:
        """(start, length) of every token of SHORTEST_RUN+ [A-Za-z0-9_-] characters."""
        if self._runs is None:
            flat = self.text.encode("ascii", "replace").translate(TOKEN_BYTES)  # one byte a character
            needle, out = b"a" * SHORTEST_RUN, []
            p = flat.find(needle)
            while p >= 0:
                e = flat.find(b" ", p)
                e = len(flat) if e < 0 else e
                out.append((p, e - p))
                p = flat.find(needle, e)
            self._runs = out
        return self._runs

    def hits(self, probe: tuple):
        text = self.text
        if probe[0] == "run":
            return [p for p, n in self.runs() if n >= probe[1]]
        if probe[0] == "re":
            return [m.start() for m in probe[1].finditer(text)]
        words = probe[1]
        if probe[0] == "ilit":
            if text.isascii():  # lowercasing keeps every offset
                text = self.lower()
            else:
                words = [v for w in words for v in dict.fromkeys((w, w.upper(), w.capitalize()))]
        out = []
        for word in words:
            p = text.find(word)
            while p >= 0:
                out.append(p)
                p = text.find("\n", p)
                p = text.find(word, p) if p >= 0 else -1
        return out

    def lines(self, probe: tuple | None) -> list[tuple[int, int]]:
        """(start, end) of the lines holding a hit of ``probe`` (all of the text for None)."""
        text = self.text
        if probe is None:
            return [(0, len(text))]
        out, last = [], -1
        for p in sorted(self.hits(probe)):
            if p <= last:
                continue
            last = text.find("\n", p)
            last = len(text) if last < 0 else last
            out.append((text.rfind("\n", 0, p) + 1, last))
        return out


class Rule(NamedTuple):
    """One expression of a detect-secrets plugin, with its probe."""

    kind: str
    rx: re.Pattern
    probe: tuple | None
    plugin: object
    ask_plugin: bool  # the plugin refines its expression's matches: ask it about each one


def rules_of(name: str, plugin) -> list[Rule]:
    probes = PROBES.get(name)
    if probes is None or len(probes) != len(plugin.denylist):
        probes = [None] * len(plugin.denylist)
    probes = [("re", re.compile(p[1])) if p and p[0] == "re" else p for p in probes]
    from detect_secrets.plugins.base import RegexBasedDetector

    ask = type(plugin).analyze_string is not RegexBasedDetector.analyze_string
    return [Rule(KINDS.get(name, name.upper()), re.compile(rx.pattern, rx.flags | re.MULTILINE), probe, plugin, ask)
            for rx, probe in zip(plugin.denylist, probes)]


def match_spans(rule: Rule, m: re.Match, text: str) -> list[tuple[int, int, str]]:
    """The secret's spans in one match: its groups (as the plugin reports them), or the whole
    match less delimiters when the groups are only a prefix."""
    spans = [m.span(g) for g in range(1, rule.rx.groups + 1) if m.end(g) > m.start(g) >= 0]
    if not spans or max(e - s for s, e in spans) < 8:
        s, e = m.span()
        while s < e and text[s] in DELIMITERS:
            s += 1
        while e > s and text[e - 1] in DELIMITERS:
            e -= 1
        spans = [(s, e)]
    out = []
    for s, e in spans:
        secret = text[s:e]
        if implausible(secret) or (rule.ask_plugin and secret not in set(rule.plugin.analyze_string(secret))):
            continue
        if rule.kind == "JWT":  # the plugin's expression stops before the signature
            e = JWT_TAIL.match(text, e).end()
        out.append((s, e, rule.kind))
    return out


def key_spans(text: str) -> list[tuple[int, int, str]]:
    """Whole private key blocks: PEM (BEGIN..END, or the base64 lines after a BEGIN) and PuTTY."""
    spans = [m.span() for rx in (KEY_BLOCK, KEY_OPEN, PUTTY_KEY) for m in rx.finditer(text)]
    return [(s, e, "PRIVATE_KEY") for s, e in spans]


def plugin_spans(kind: str, plugin, text: str) -> list[tuple[int, int, str]]:
    """Findings of a plugin that is not expression-based: high-entropy strings, keywords."""
    from detect_secrets.filters.heuristic import is_likely_id_string
    from detect_secrets.plugins.high_entropy_strings import HighEntropyStringsPlugin

    out = []
    if isinstance(plugin, HighEntropyStringsPlugin):
        shortest = 2 ** plugin.entropy_limit  # no shorter string can pass the limit
        for m in plugin.regex.finditer(text):
            s, e = m.span(2)
            if e - s <= shortest:
                continue
            secret = m.group(2)
            if plugin.calculate_shannon_entropy(secret) <= plugin.entropy_limit or implausible(secret):
                continue
            ls, le = text.rfind("\n", 0, s) + 1, text.find("\n", e)
            if not is_likely_id_string(secret, text[ls:le if le >= 0 else len(text)], plugin):
                out.append((s, e, kind))
        return out
    pos = 0
    for line in text.split("\n"):
        for secret in plugin.analyze_string(line):
            i = line.find(secret) if secret else -1
            if i >= 0 and not implausible(secret):
                out.append((pos + i, pos + i + len(secret), kind))
        pos += len(line) + 1
    return out


def pii_spans(text: str, probe: Probe, emails: bool, ips: bool) -> list[tuple[int, int, str]]:
    """E-mail addresses, and IPv4 addresses in the public (global) ranges, not version numbers."""
    out = []
    if emails:
        out += [(*m.span(), "EMAIL") for s, e in probe.lines(AT_PROBE) for m in EMAIL.finditer(text, s, e)]
    if ips:
        for m in (m for s, e in probe.lines(IPV4_PROBE) for m in IPV4.finditer(text, s, e)):
            s, e = m.span()
            before, after = text[s - 1:s], text[e:e + 2]
            if before.isalnum() or before in ("_", ".") or after[:1].isalnum() or after[:1] == "_" \
                    or (after[:1] == "." and after[1:].isdigit()):
                continue  # part of a longer number or name
            if "version" in text[max(0, s - 16):s].lower():
                continue
            try:
                public = ipaddress.ip_address(m.group()).is_global
            except ValueError:
                continue
            if public:
                out.append((s, e, "IP_ADDRESS"))
    return out


def outside(spans: list[tuple[int, int, str]], taken: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """The ``spans`` that overlap none of ``taken`` (sorted, disjoint): a password in a URL
    stays a password, not the e-mail address it looks like."""
    starts = [s for s, _, _ in taken]
    out = []
    for s, e, kind in spans:
        i = bisect.bisect_right(starts, s)
        if (i and taken[i - 1][1] > s) or (i < len(taken) and taken[i][0] < e):
            continue
        out.append((s, e, kind))
    return out


def merge(spans: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Overlapping spans become one, of the kind of the first."""
    out: list[tuple[int, int, str]] = []
    for s, e, kind in sorted(spans, key=lambda x: (x[0], -x[1])):
        if out and s < out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e, out[-1][2])
            continue
        out.append((s, e, kind))
    return out


@stage_config
class SecretsConfig:
    # detect-secrets plugins (class names) whose findings are replaced. Also known:
    # KeywordDetector, IPPublicDetector, and the entropy plugins (see `entropy`).
    detectors: list[str] = field(default_factory=lambda: list(DEFAULT_DETECTORS))
    # Also Base64HighEntropyString (limit 4.5) and HexHighEntropyString (3.0): off, as they
    # flag much ordinary code (hashes, test data).
    entropy: bool = False
    emails: bool = True  # replace e-mail addresses with <EMAIL>
    ip_addresses: bool = True  # replace public IPv4 addresses with <IP_ADDRESS>
    max_secret_fraction: float = 0.5  # documents with a larger share of secret characters are removed


@register
class Secrets(Filter):
    """Replaces secrets and personal data by typed placeholders, as the StarCoder PII pipeline
    (Li et al. 2023, section 4) does with detect-secrets: ``<AWS_KEY>``, ``<PRIVATE_KEY>`` (a
    whole key block), ``<EMAIL>``, ``<IP_ADDRESS>``… Each replacement is counted as
    ``scrubbed.<kind>``. Reason: ``mostly_secrets``, a document that is more secret than not."""

    name: ClassVar[str] = "secrets"
    Config: ClassVar[type] = SecretsConfig

    def __init__(self, cfg=None):
        super().__init__(cfg)
        known = plugin_classes()
        names = list(dict.fromkeys([*self.cfg.detectors, *(ENTROPY_DETECTORS if self.cfg.entropy else [])]))
        bad = [n for n in names if n not in known]
        if bad:
            raise ConfigError(f"config key 'curate.filters.secrets.detectors': unknown detector(s) "
                              f"{', '.join(map(repr, bad))} (known: {', '.join(sorted(known))})")
        from detect_secrets.plugins.base import RegexBasedDetector

        self._keys, self._rules, self._others = "PrivateKeyDetector" in names, [], []
        for n in names:
            if n == "PrivateKeyDetector":
                continue
            plugin = known[n]()
            if isinstance(plugin, RegexBasedDetector):
                self._rules += rules_of(n, plugin)
            else:
                self._others.append((KINDS.get(n, n.upper()), plugin))

    def find(self, text: str) -> list[tuple[int, int, str]]:
        """Every secret's (start, end, kind), overlaps merged."""
        probe, found = Probe(text), []
        if self._keys and ("PRIVATE KEY" in text or "PuTTY-User-Key-File-" in text):
            found += key_spans(text)
        for rule in self._rules:
            for s, e in probe.lines(rule.probe):
                for m in rule.rx.finditer(text, s, e):
                    found += match_spans(rule, m, text)
        for kind, plugin in self._others:
            found += plugin_spans(kind, plugin, text)
        found = merge(found)
        pii = pii_spans(text, probe, self.cfg.emails, self.cfg.ip_addresses)
        return merge(found + outside(pii, found)) if pii else found

    def apply(self, doc: Doc) -> str | None:
        text = doc.text
        spans = self.find(text) if text else []
        if not spans:
            return None
        if sum(e - s for s, e, _ in spans) > self.cfg.max_secret_fraction * len(text):
            return "mostly_secrets"
        pieces, last, kinds = [], 0, Counter()
        for s, e, kind in spans:
            pieces += (text[last:s], f"<{kind}>")
            kinds[kind] += 1
            last = e
        pieces.append(text[last:])
        doc.text, doc.changed = "".join(pieces), True
        for kind, n in kinds.items():
            doc.counts[f"scrubbed.{kind.lower()}"] += n
        return None
