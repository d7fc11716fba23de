"""The curation filters on crafted documents: each expected outcome is worked out by hand in
the test (counts of words, lines and characters), never by asking the code under test."""

from __future__ import annotations

import socket

import pytest

from lmpipe.errors import ConfigError
from spark_jobs.curate import filters as flib
from spark_jobs.curate.base import FILTERS, Doc, Filter, run_chain


def one(name: str, **cfg) -> Filter:
    return flib.build([{name: cfg}], ["en"])[0]


def verdict(f: Filter, text: str) -> str | None:
    return f.apply(Doc(text))


# ----------------------------------------------------------------------------------------------
# gopher_quality

# 15 words, 55 characters: mean length 3.67; stop words the, to, and, with.
SENTENCE = "The river runs to the sea and the town has a market with fresh bread."
GOOD_PROSE = " ".join([SENTENCE] * 6)  # 90 words on one line


def test_gopher_quality_keeps_prose():
    assert verdict(one("gopher_quality"), GOOD_PROSE) is None


@pytest.mark.parametrize("text, cfg, reason", [
    ("The cat sat with the dog.", {}, "too_few_words"),  # 6 words < 50
    (GOOD_PROSE, {"max_words": 20}, "too_many_words"),  # 90 > 20
    ("to be a b c d e f g h " * 6, {}, "mean_word_length"),  # 60 words, 72 characters: 1.2 < 3
    ("extraordinarily " * 60, {}, "mean_word_length"),  # 15 > 10
    (GOOD_PROSE + " #tag" * 20, {}, "symbol_ratio"),  # 20 '#' over 110 words > 0.1
    (GOOD_PROSE + " wait..." * 20, {}, "symbol_ratio"),  # 20 ellipses over 110 words
    # 10 lines of '-' + 8 words: 80 words (the '-' are punctuation), all lines bulleted
    ("\n".join(["- the item with some words here and more"] * 10), {}, "bullet_lines"),
    # 4 lines, 57 words, 2 ellipses (0.035 per word) ending 2 of the 4 lines (0.5 > 0.3)
    ("\n".join(["the market opens early with fresh bread and fruit for the whole town" + end
                for end in (" today", " and then...", " later...", " again")]), {}, "ellipsis_lines"),
    (GOOD_PROSE + " 123" * 30, {}, "alpha_words"),  # 90 of 120 words have a letter: 0.75 < 0.8
    # 55 words without any of the stop words ("toward" is not "to")
    ("Rivers carry water toward distant seas while forests grow quietly nearby. " * 5, {}, "stop_words"),
])
def test_gopher_quality_reasons(text, cfg, reason):
    assert verdict(one("gopher_quality", **cfg), text) == reason


def test_gopher_quality_stop_words_match_whole_words_in_any_case():
    base = "Rivers carry water toward distant seas while forests grow quietly nearby. " * 5
    assert verdict(one("gopher_quality"), base + "The end") == "stop_words"  # one stop word
    assert verdict(one("gopher_quality"), base + "The end of it") is None  # The, of


# ----------------------------------------------------------------------------------------------
# gopher_repetition

DISTINCT_LINES = [
    "Rivers carry water from the mountains down to the sea.",
    "Forests grow slowly on the northern slopes of hills.",
    "Farmers bring fresh bread and fruit to the market.",
    "Children walk to school along the old stone bridge.",
    "Winter nights are long and cold in the valley town.",
    "Bakers light their ovens before the sun comes up.",
    "Fishermen mend nets while gulls circle over boats.",
    "Teachers read stories aloud in warm bright classrooms.",
    "Painters mix colors for a mural on the library wall.",
    "Travelers rest at an inn beside the quiet crossroads.",
]


def test_gopher_repetition_keeps_varied_text():
    # No line repeats; "to the" (2 x 6 characters) is the top 2-gram of ~530 characters.
    assert verdict(one("gopher_repetition"), "\n".join(DISTINCT_LINES)) is None


def test_gopher_repetition_duplicate_lines_and_paragraphs():
    a, b, c = DISTINCT_LINES[:3]
    assert verdict(one("gopher_repetition"), "\n".join([a, b, c, a, a])) == "dup_lines"  # 2/5 > 0.3
    assert verdict(one("gopher_repetition"), "\n\n".join([a, b, a, a])) == "dup_paragraphs"  # 2/4


def test_gopher_repetition_duplicate_line_characters():
    short = [f"Line {w} is short." for w in ("one", "two", "six", "ten", "red", "big", "old", "new", "far")]
    long = "This single long line is repeated exactly once and it holds about a hundred characters!!"
    # 9 lines of 18 characters, the long one (88) twice, 10 newlines: 348 characters. One
    # repeated line of 11 (0.09 <= 0.3), but its 88 characters are 88/348 = 0.25 > 0.2.
    text = "\n".join([*short, long, long])
    assert (len(text), len(long)) == (348, 88)  # the arithmetic above
    assert verdict(one("gopher_repetition"), text) == "dup_line_chars"


def test_gopher_repetition_top_bigram():
    # "hello world" 20 times (11 characters each) in 239 characters: 0.92 > 0.2
    assert verdict(one("gopher_repetition"), " ".join(["hello world"] * 20)) == "top_2gram"


def test_gopher_repetition_duplicate_5grams():
    # An 11-word phrase (63 letters, 73 characters) twice around 223 characters of words that
    # never repeat: 371 characters. Its second time covers 63 letters of repeated 5-grams,
    # 63/371 = 0.17 > 0.15, while its most frequent n-grams (count 2) stay under their limits
    # (4-gram at most 2 x 28 = 56, 0.151 < 0.16).
    phrase = "amber bridges carry dusty engines from glowing harbors into jade kingdoms"
    filler = ("lemon meadows near old ponds quietly reflect silver trees under violet winter skies while "
              "young zebras wander across yellow zones gentle hills hold ancient olive orchards beside "
              "quiet rivers many small birds sing every dawn")
    text = f"{phrase} {filler} {phrase}"
    assert (len(phrase), len(filler), len(text)) == (73, 223, 371)
    assert verdict(one("gopher_repetition"), text) == "dup_5gram"
    assert verdict(one("gopher_repetition", dup_ngrams={5: 0.2}), text) is None  # 0.17 <= 0.2


# ----------------------------------------------------------------------------------------------
# c4

def test_c4_keeps_and_rewrites_lines():
    text = "\n".join([
        "The town market opens early every day.",
        "Menu",  # no terminal punctuation
        "Please enable JavaScript to view this page.",  # javascript
        "Farmers sell bread.[1]",  # citation removed
        "Go now.",  # 2 words
        "Children buy fresh fruit. They love apples!",  # 2 sentences
        "The river runs past the old mill.",
        "Read our privacy policy for details.",  # policy
        "Winter evenings are long and quiet here.",
    ])
    doc = Doc(text)
    assert flib.build(["c4"], ["en"])[0].apply(doc) is None  # 6 sentences >= 5
    assert doc.changed
    assert doc.text == ("The town market opens early every day.\nFarmers sell bread.\n"
                        "Children buy fresh fruit. They love apples!\nThe river runs past the old mill.\n"
                        "Winter evenings are long and quiet here.")


def test_c4_unchanged_document_is_not_marked_changed():
    doc = Doc("\n".join(DISTINCT_LINES[:5]))
    assert one("c4").apply(doc) is None
    assert not doc.changed


@pytest.mark.parametrize("text, reason", [
    ("One line here is fine.\nAnother line is also fine.", "too_few_sentences"),  # 2 < 5
    ("Lorem ipsum dolor sit amet.\n" + "\n".join(DISTINCT_LINES[:5]), "lorem_ipsum"),
    ("The function f(x) {return x;} is here.\n" + "\n".join(DISTINCT_LINES[:5]), "curly_bracket"),
    ("menu\nhome\nabout us", "no_lines_left"),
])
def test_c4_reasons(text, reason):
    assert verdict(one("c4"), text) == reason


def test_c4_curly_brackets_can_be_allowed():
    assert verdict(one("c4", curly_bracket=False), "The function f(x) {return x;} is here.\n"
                   + "\n".join(DISTINCT_LINES[:5])) is None


# ----------------------------------------------------------------------------------------------
# fineweb

def test_fineweb_keeps_prose():
    # 3 lines over 30 characters ending in '.', 2 newlines for 28 words
    assert verdict(one("fineweb"), "\n".join(DISTINCT_LINES[:3])) is None


@pytest.mark.parametrize("text, reason", [
    ("\n".join(f"a heading without a stop {i}" for i in range(10)), "line_punct_ratio"),  # 0/10
    ("Yes.\nNo.\nMaybe.\n" + DISTINCT_LINES[0], "short_line_ratio"),  # 3/4 >= 0.67 short
    ("\n".join([DISTINCT_LINES[0], DISTINCT_LINES[1], DISTINCT_LINES[0]]), "char_dup_ratio"),  # ~1/3
    # 4 lines of 34-35 characters, 2 words each: 3 newlines / 8 words = 0.375 > 0.3
    ("Extraordinarily comprehensiveness.\nUnquestionably incomprehensibility.\n"
     "Internationally institutionalized.\nCharacteristically uncharacteristic.", "list_ratio"),
])
def test_fineweb_reasons(text, reason):
    assert verdict(one("fineweb"), text) == reason


# ----------------------------------------------------------------------------------------------
# language

ENGLISH = ("The committee published its annual report on Tuesday, describing how the city plans to "
           "improve public transport and reduce traffic in the coming years.")
FRENCH = ("Le comité a publié mardi son rapport annuel, qui décrit comment la ville compte améliorer "
          "les transports publics et réduire la circulation dans les années à venir.")
GERMAN = ("Der Ausschuss hat am Dienstag seinen Jahresbericht veröffentlicht, der beschreibt, wie die "
          "Stadt den öffentlichen Verkehr verbessern und den Verkehr in den kommenden Jahren verringern will.")


@pytest.fixture
def no_network(monkeypatch):
    """Every connection attempt fails the test; the model is loaded afresh under the guard."""
    def refuse(*_a, **_k):
        raise AssertionError("the language filter tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    flib.lid_detector.cache_clear()
    yield
    flib.lid_detector.cache_clear()


@pytest.mark.parametrize("text, reason, lang", [
    (ENGLISH, None, "en"), (FRENCH, "language", "fr"), (GERMAN, "language", "de"),
    ("\n".join(ENGLISH.split(", ")), None, "en"),  # newlines are spaces to fastText
])
def test_language_keeps_english(no_network, text, reason, lang):
    doc = Doc(text)
    assert one("language", languages=["en"]).apply(doc) == reason
    assert doc.counts == {f"lang.{lang}": 1}


def test_language_defaults_to_the_curate_languages(no_network):
    f = flib.build(["language"], ["en", "fr"])[0]
    assert f.cfg.languages == ["en", "fr"]
    assert verdict(f, FRENCH) is None and verdict(f, GERMAN) == "language"


def test_language_reads_the_whole_text(no_network):
    # A 75-character English opening, then three times as much French: French wins on the
    # whole text (an 80-character prefix would say English).
    opening = "Hello and welcome, this short English greeting opens the page for visitors."
    doc = Doc(opening + "\n" + " ".join([FRENCH] * 3))
    assert one("language", languages=["en"]).apply(doc) == "language"
    assert doc.counts == {"lang.fr": 1}


@pytest.mark.parametrize("text", ["", "   \n\t \n"])
def test_language_empty_text_is_no_text(text):
    doc = Doc(text)
    assert one("language").apply(doc) == "no_text"
    assert not doc.counts


def test_language_low_confidence_is_counted():
    doc = Doc(ENGLISH)
    assert one("language", min_score=1.01).apply(doc) == "low_confidence"  # scores are at most 1
    assert doc.counts == {"lang.en": 1}


# ----------------------------------------------------------------------------------------------
# code filters

@pytest.mark.parametrize("text, reason", [
    ("def f(x):\n    return x + 1\n", None),
    # 19 lines of 5 characters and one of 1000 (the limit, not over it): mean 1095/20 = 54.75
    ("x = 1\n" * 19 + "y" * 1000 + "\n", None),
    ("x = 1\n" * 19 + "y" * 1001 + "\n", "long_line"),
    ("\n".join(["z" * 150] * 3), "long_mean_line"),  # mean 150 > 100, longest 150 <= 1000
])
def test_code_lines(text, reason):
    assert verdict(one("code_lines"), text) == reason


@pytest.mark.parametrize("text, reason", [
    ("ab" + "=" * 6, None),  # 2/8 = 0.25, not under it
    ("a" + "=" * 9, "low_alphanumeric"),  # 1/10
    ("é" + "=" * 3, None),  # 1/4: a non-ASCII letter counts
    ("é" + "=" * 4, "low_alphanumeric"),  # 1/5
    ("", None),
])
def test_alphanumeric(text, reason):
    assert verdict(one("alphanumeric"), text) == reason


@pytest.mark.parametrize("text, cfg, reason", [
    ("# Generated by Django 4.2 on 2023-01-01\nfrom django.db import migrations\n", {}, "autogenerated"),
    ("// Code generated by protoc. DO NOT EDIT.\npackage pb\n", {}, "autogenerated"),
    ("/* AUTO-GENERATED FILE */\nint x;\n", {}, "autogenerated"),
    ("a = 1\n" * 5 + "# generated by a tool\n", {}, None),  # sixth line: past the first 5
    ("a = 1\n# do not edit\n", {"lines": 1}, None),
    ("# Do not touch: made by the build\n", {"markers": ["DO NOT TOUCH"]}, "autogenerated"),
    ("import os\n\nprint(os.getcwd())\n", {}, None),
])
def test_autogenerated(text, cfg, reason):
    assert verdict(one("autogenerated", **cfg), text) == reason


# ----------------------------------------------------------------------------------------------
# secrets

PEM = ("-----BEGIN RSA PRIVATE KEY-----\n"
       "MIIEowIBAAKCAQEAx4UbaDzY5Ejn2bvPq8iPzHkRq3Uy0xAvdF9Vb8NxLw3tGsKm\n"
       "Pq2Ylq4Dd1nVw7eR5Tj0oHcXsQe9WbFzLmK8uA3vNpD6gI1yCrEt4Z7hMxJwOkSf\n"
       "-----END RSA PRIVATE KEY-----")
FILLER = "total = compute_total(values, weights)  # ordinary code that is no secret at all\n" * 6


def test_secrets_replaces_each_kind_with_its_placeholder():
    text = ('aws_key = "AKIAIOSFODNN7EXAMPLE"\n'
            'contact = "jane.doe@example.com"\n'
            'server = "93.184.216.34"\n'
            'local = "192.168.1.10"\n'  # private: not personal data
            + PEM + "\nprint('done')\n" + FILLER)
    doc = Doc(text)
    assert one("secrets").apply(doc) is None
    assert doc.text == ('aws_key = "<AWS_KEY>"\ncontact = "<EMAIL>"\nserver = "<IP_ADDRESS>"\n'
                        'local = "192.168.1.10"\n<PRIVATE_KEY>\nprint(\'done\')\n' + FILLER)
    assert doc.changed
    assert doc.counts == {"scrubbed.aws_key": 1, "scrubbed.email": 1, "scrubbed.ip_address": 1,
                          "scrubbed.private_key": 1}


def test_secrets_counts_each_occurrence_and_keeps_passwords_in_urls_apart_from_emails():
    doc = Doc('a = "bob@example.org"\nb = "amy@example.org"\n'
              'db = "postgres://admin:hunter2pass@db.example.com:5432/prod"\n' + FILLER)
    assert one("secrets").apply(doc) is None
    assert doc.text.startswith('a = "<EMAIL>"\nb = "<EMAIL>"\n'
                               'db = "postgres://admin:<PASSWORD>@db.example.com:5432/prod"\n')
    assert doc.counts == {"scrubbed.email": 2, "scrubbed.password": 1}


def test_secrets_leaves_clean_code_alone():
    doc = Doc('if line.startswith("-----BEGIN RSA PRIVATE KEY-----"):\n    version = "1.2.3.4"\n' + FILLER)
    before = doc.text
    assert one("secrets").apply(doc) is None
    assert doc.text is before and not doc.changed and not doc.counts


def test_secrets_mostly_secrets_is_removed():
    doc = Doc(PEM + "\n")  # all but one character is key material
    assert one("secrets").apply(doc) == "mostly_secrets"
    assert not doc.changed and not doc.counts
    assert one("secrets", max_secret_fraction=1.0).apply(Doc(PEM + "\n")) is None


def test_secrets_entropy_plugins_are_opt_in():
    text = 'k = "hJ8s7Fq2LmZ9xW4vB1nR6tY3uP0oE5cD"\n' + FILLER  # 32 distinct characters: 5 bits
    assert one("secrets").find(text) == []
    doc = Doc(text)
    assert one("secrets", entropy=True).apply(doc) is None
    assert doc.text == 'k = "<SECRET>"\n' + FILLER


def test_secrets_unknown_detector_names_its_key():
    with pytest.raises(ConfigError, match=r"curate\.filters\.secrets\.detectors.*'NoSuchDetector'"):
        one("secrets", detectors=["AWSKeyDetector", "NoSuchDetector"])


# ----------------------------------------------------------------------------------------------
# chain and builder

class Boom(Filter):
    name = "boom"
    Config = dict

    def apply(self, doc):
        raise ValueError("odd document")


def test_run_chain_counts_a_raising_filter_as_error():
    assert run_chain([one("alphanumeric"), Boom({})], Doc("def f(): pass")) == ("boom", "error")
    assert run_chain([one("alphanumeric"), Boom({})], Doc("=" * 10)) == ("alphanumeric", "low_alphanumeric")
    assert run_chain([one("alphanumeric")], Doc("def f(): pass")) is None


def test_importing_filters_registers_every_filter():
    assert {"gopher_quality", "gopher_repetition", "c4", "fineweb", "language", "code_lines", "alphanumeric",
            "autogenerated", "secrets"} <= set(FILTERS)


@pytest.mark.parametrize("preset, names", [
    ("code", ["code_lines", "alphanumeric", "autogenerated", "secrets"]),
    ("web", ["language", "gopher_repetition", "gopher_quality", "c4", "fineweb"]),
    ("none", []),
])
def test_presets_build(preset, names):
    assert [f.name for f in flib.build(preset, ["en"])] == names


def test_build_items_and_config():
    chain = flib.build(["c4", {"fineweb": {"short_line_length": 10}}, {"language": {"languages": ["de"]}},
                        {"secrets": None}], ["en"])
    assert [f.name for f in chain] == ["c4", "fineweb", "language", "secrets"]
    assert chain[1].cfg.short_line_length == 10 and chain[2].cfg.languages == ["de"]


@pytest.mark.parametrize("spec, message", [
    (["nope"], r"curate\.filters.*unknown filter 'nope'.*gopher_quality"),
    ("webb", r"curate\.filters.*unknown preset 'webb'.*code, web, none"),
    ([{"c4": {"min_sentencez": 3}}], r"unknown config key 'curate\.filters\.c4\.min_sentencez'"),
    ([{"c4": {"min_sentences": "many"}}], r"config key 'curate\.filters\.c4\.min_sentences'"),
    (["c4", {"c4": {}}], r"curate\.filters.*'c4' is listed twice"),
    ([{"c4": {}, "fineweb": {}}], r"curate\.filters.*one-key mapping"),
    ([{"c4": [1]}], r"curate\.filters.*must be a mapping"),
    ([3], r"curate\.filters.*filter name or a one-key mapping"),
])
def test_build_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        flib.build(spec, ["en"])
