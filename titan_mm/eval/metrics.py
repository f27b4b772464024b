"""Answer metrics of the evaluation harness: exact match, ANLS, and the option letter of a
multiple-choice answer. Pure functions of strings, so that a task scored on its own reference
answers scores 100%."""

import re
import string

ANLS_THRESHOLD = 0.5
"""ANLS (Biten et al. 2019, ST-VQA / DocVQA): a prediction whose normalised Levenshtein distance to
a reference is at or above this scores 0 against it."""


def normalize_exact(text: str) -> str:
    """Exact match compares answers lower-cased, with white space collapsed and punctuation around
    the answer removed ("Two." == "two")."""
    return " ".join(text.lower().split()).strip(string.punctuation + " ")


def exact_match(prediction: str, references: list[str]) -> float:
    """1.0 when the prediction equals any reference after ``normalize_exact``, else 0.0."""
    references = [references] if isinstance(references, str) else references
    p = normalize_exact(prediction)
    return float(any(p == normalize_exact(r) for r in references))


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of characters)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, references: list[str], threshold: float = ANLS_THRESHOLD) -> float:
    """Average normalised Levenshtein similarity of one answer: the best over the references of
    1 - NL (NL = edit distance / the longer length, both lower-cased with white space collapsed),
    0 where NL >= threshold. The standard DocVQA / ST-VQA scorer."""
    references = [references] if isinstance(references, str) else references
    p = " ".join(prediction.strip().lower().split())
    best = 0.0
    for reference in references:
        r = " ".join(reference.strip().lower().split())
        nl = levenshtein(p, r) / max(len(p), len(r)) if (p or r) else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def option_letter(answer: str, options: dict[str, str]) -> str | None:
    """The option a generated multiple-choice answer picks: the answer is a letter alone or one
    that opens it with ")", "." or ":" ("B", "(B)", "B.", "B: red"; not "A red square", where "A"
    is an article), else the only option whose text the answer is (case-insensitive, punctuation
    around it ignored). None when it picks no option."""
    letters = "".join(options)
    leading = re.match(rf"^\(?([{letters}])(?:[).:]|$)", answer.strip())
    if leading:
        return leading.group(1)
    named = [letter for letter, option in options.items() if normalize_exact(option) == normalize_exact(answer)]
    return named[0] if len(named) == 1 else None
