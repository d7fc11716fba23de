"""A generated web-like corpus whose truth is known: planted near-duplicates, similar but
distinct documents, other languages and contamination, for curation's tests and benchmarks.

English sentences come from the interpreter's own prose (``pydoc_data.topics`` and the
standard library's docstrings), so nothing is downloaded; French and German ones are a short
list below. Near copies are edited word by word until the Jaccard similarity of their word
5-gram sets with the original, computed here with plain sets, falls in the asked range.
"""

from __future__ import annotations

import ast
import json
import random
import re
import sysconfig
from functools import lru_cache
from pathlib import Path

FRENCH = [
    "Le chat dort tranquillement sur le canapé du salon pendant que la pluie tombe dehors.",
    "Nous avons visité le marché du village et acheté des fromages et du pain frais.",
    "La réunion de demain matin a été reportée à cause de la grève des transports.",
    "Les enfants jouent dans le jardin pendant que leurs parents préparent le dîner.",
    "Il faut absolument que tu lises ce roman avant la fin des vacances d'été.",
    "La bibliothèque municipale ouvre ses portes à neuf heures tous les jours de la semaine.",
    "Mon frère travaille dans une petite entreprise qui fabrique des meubles en bois.",
    "Le train pour Lyon partira avec un retard d'environ vingt minutes ce soir.",
    "Elle a décidé de changer de métier après dix ans passés dans la même banque.",
    "Les habitants du quartier se plaignent du bruit causé par les travaux de la rue.",
    "Nous espérons que le beau temps durera jusqu'à la fin du mois prochain.",
    "Le musée présente une nouvelle exposition consacrée aux peintres impressionnistes.",
]
GERMAN = [
    "Der Hund schläft ruhig auf dem Sofa, während draußen der Regen fällt.",
    "Wir haben den Markt im Dorf besucht und frisches Brot und Käse gekauft.",
    "Die Besprechung morgen früh wurde wegen des Streiks verschoben.",
    "Die Kinder spielen im Garten, während ihre Eltern das Abendessen vorbereiten.",
    "Du musst diesen Roman unbedingt vor dem Ende der Sommerferien lesen.",
    "Die Stadtbibliothek öffnet jeden Tag der Woche um neun Uhr ihre Türen.",
    "Mein Bruder arbeitet in einer kleinen Firma, die Möbel aus Holz herstellt.",
    "Der Zug nach München fährt heute Abend mit etwa zwanzig Minuten Verspätung ab.",
    "Sie hat beschlossen, nach zehn Jahren in derselben Bank den Beruf zu wechseln.",
    "Die Bewohner des Viertels beschweren sich über den Lärm der Bauarbeiten.",
    "Wir hoffen, dass das schöne Wetter bis zum Ende des nächsten Monats anhält.",
    "Das Museum zeigt eine neue Ausstellung über die Maler des Impressionismus.",
]
WORD = re.compile(r"\w+")


def shingles(text: str, n: int = 5) -> set[str]:
    w = WORD.findall(text.lower())
    return {" ".join(w[i:i + n]) for i in range(max(1, len(w) - n + 1))}


def _grams(text: str, n: int = 13) -> set[str]:
    w = WORD.findall(text.lower())
    return {" ".join(w[i:i + n]) for i in range(len(w) - n + 1)}


def jaccard(a: str, b: str) -> float:
    x, y = shingles(a), shingles(b)
    return len(x & y) / len(x | y)


@lru_cache(maxsize=1)
def english_sentences() -> tuple[str, ...]:
    """About 2,000 distinct English sentences of 8 to 40 mostly alphabetic words."""
    from pydoc_data.topics import topics

    texts = list(topics.values())
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(p.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        texts += [ast.get_docstring(n) or "" for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    out = set()
    for t in texts:
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", re.sub(r"\s+", " ", t)):
            w = s.split()
            if 8 <= len(w) <= 40 and s.endswith(".") and sum(x.strip(',;:()"').isalpha() for x in w) / len(w) > 0.9:
                out.add(s)
    return tuple(sorted(out))


def _doc(rng: random.Random, pool, sentences: int = 12, paragraphs: int = 3) -> str:
    picked = rng.sample(pool, sentences)
    per = max(1, sentences // paragraphs)
    return "\n\n".join(" ".join(picked[i:i + per]) for i in range(0, sentences, per))


def near_copy(rng: random.Random, text: str, lo: float, hi: float, vocab) -> str | None:
    """``text`` with words replaced, inserted or deleted until its Jaccard is in [lo, hi]."""
    target = rng.uniform(lo, hi)
    words = text.split(" ")
    for _ in range(400):
        i = rng.randrange(len(words))
        if not words[i].isalpha():
            continue  # sentence ends and paragraph breaks stay: line-based filters see the same lines
        op = rng.random()
        if op < 0.6:
            words[i] = rng.choice(vocab)
        elif op < 0.8:
            words.insert(i, rng.choice(vocab))
        elif len(words) > 20:
            del words[i]
        copy = " ".join(words)
        j = jaccard(text, copy)
        if j <= target:
            return copy if lo <= j <= hi else None
    return None


def generate(out: Path, docs: int = 200, near: int = 30, similar: int = 20, foreign: int = 20,
             contaminated: int = 3, seed: int = 0, near_range=(0.7, 0.95)) -> dict:
    """Write ``out/corpus/corpus.jsonl`` and ``out/eval/eval.jsonl``; return the truth: the ids
    of each planted kind, and the Jaccard of each near copy."""
    rng = random.Random(seed)
    sentences = list(english_sentences())
    rng.shuffle(sentences)
    held = sentences[:60]
    held_grams = {g for h in held for g in _grams(h)}
    # Evaluation texts never appear by chance: no corpus sentence shares a 13-gram with them.
    pool = [x for x in sentences[60:] if not _grams(x) & held_grams]
    vocab = sorted({w for s in pool for w in s.split() if w.isalpha()})
    evals = [" ".join(held[i:i + 3]) for i in range(0, 60, 3)]
    base = [{"id": f"doc-{i:05d}", "text": _doc(rng, pool)} for i in range(docs)]
    extra, truth = [], {"near": {}, "similar": [], "foreign": [], "contaminated": []}
    while len(truth["near"]) < near:
        src = rng.choice(base)
        copy = near_copy(rng, src["text"], *near_range, vocab)
        if copy is not None:
            doc_id = f"near-{len(truth['near']):05d}-of-{src['id']}"
            truth["near"][doc_id] = round(jaccard(src["text"], copy), 3)
            extra.append({"id": doc_id, "text": copy})
    for i in range(similar):  # a third of a base document's sentences, the rest new
        src = rng.choice(base)["text"].split(". ")
        keep = src[: len(src) // 3]
        text = ". ".join(keep) + ". " + _doc(rng, pool, 8, 2)
        truth["similar"].append(f"similar-{i:05d}")
        extra.append({"id": truth["similar"][-1], "text": text})
    for i in range(foreign):
        lang, pool_l = ("fr", FRENCH) if i % 2 == 0 else ("de", GERMAN)
        truth["foreign"].append(f"{lang}-{i:05d}")
        extra.append({"id": truth["foreign"][-1], "text": _doc(rng, pool_l, 8, 2)})
    for i in range(contaminated):
        truth["contaminated"].append(f"contaminated-{i:05d}")
        extra.append({"id": truth["contaminated"][-1], "text": _doc(rng, pool, 6, 2) + "\n\n" + rng.choice(evals)})
    rng.shuffle(extra)
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    (out / "eval").mkdir(parents=True, exist_ok=True)
    with open(out / "corpus" / "corpus.jsonl", "w", encoding="utf-8") as f:
        for d in base + extra:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    with open(out / "eval" / "eval.jsonl", "w", encoding="utf-8") as f:
        for i, q in enumerate(evals):
            f.write(json.dumps({"question": q, "answer": f"answer {i}"}) + "\n")
    return {**truth, "documents": len(base) + len(extra)}
