"""Scoring rules of the benchmarks, as the original's evaluation harness applies them (docs/eval.md).

Pure functions of (model output, ground truth): no model, no files. Each returns a per-question value
that is aggregated by the benchmark (a mean, or POPE's per-category accuracy/F1).
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Sequence

# --- VQA answer normalisation (the EvalAI processor that the official VQA/TextVQA evaluations use) ---

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# Both patterns as the official script writes them, quirks included: "(?!<=\d)" is a lookahead (so a
# period before a digit is kept, any other period dropped) and the period substitution is passed
# re.UNICODE as its *count*.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, re.UNICODE)


def _digits_articles(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_normalize(answer: str) -> str:
    """EvalAI's answer processing: lower case, drop commas/'?', punctuation, number words -> digits,
    articles removed, contractions restored ("dont" -> "don't")."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy: min(1, #other annotators agreeing / 3), averaged over the leave-one-annotator-
    out subsets of the (normalised) ground-truth answers. 10 annotators: 3 agreeing answers score 0.9,
    4 or more score 1.0."""
    if not answers:
        raise ValueError("a VQA question needs at least one ground-truth answer")
    pred = vqa_normalize(prediction)
    gts = [vqa_normalize(a) for a in answers]
    accs = [min(1.0, sum(1 for j, g in enumerate(gts) if j != i and g == pred) / 3) for i in range(len(gts))]
    return sum(accs) / len(accs)


def vqa_exact_match(prediction: str, answer: str) -> float:
    """GQA: 1 when the normalised prediction equals the normalised answer."""
    return float(vqa_normalize(prediction) == vqa_normalize(answer))


def strip_punctuation_lower(text: str) -> str:
    """What the original's GQA scorer compares: every string.punctuation character removed, lower case."""
    return text.translate(str.maketrans("", "", string.punctuation)).lower()


def vqa_output(output: str) -> str:
    """The original's post-processing of short VQA outputs before scoring ('\\n', '.', ',' removed, lower
    case, cut at <|endofchunk|>)."""
    return output.replace("\n", "").replace(".", "").replace(",", "").lower().split("<|endofchunk|>")[0]


# --- Multiple choice by generated letter (MMBench, SEED-Bench, MMStar) ---

def mc_substring(output: str, answer: str, case_sensitive: bool = False) -> float:
    """The original's check: the answer letter occurs anywhere in the output (so "a cat" counts as "A"
    when case-insensitive, as MMBench and SEED-Bench score; MMStar is case-sensitive)."""
    if case_sensitive:
        return float(answer in output)
    return float(answer.lower() in output.lower())


_LETTER = re.compile(r"^\(?([A-Z])(?:[).:]|\s|$)")


def mc_letter(output: str) -> str | None:
    """The option letter an output starts with ("B", "B.", "(B)", "B) text", "B: text"), else None."""
    m = _LETTER.match(output.strip())
    return m.group(1) if m else None


def mc_strict(output: str, answer: str) -> float:
    """1 when the output starts with exactly the answer letter (see mc_letter)."""
    return float(mc_letter(output) == answer)


# --- Yes/no (POPE) ---

def yes_no(output: str) -> str:
    """The original's POPE parsing: strip ',' then '.' at both ends, lower case; anything but "yes" or
    "no" stays as it is (and counts as wrong, and as a "no" for precision/recall)."""
    return output.strip(",").strip(".").lower()


def binary_metrics(preds: Sequence[str], labels: Sequence[str]) -> dict:
    """Accuracy, precision, recall and F1 with "yes" as the positive class."""
    tp = sum(p == "yes" and t == "yes" for p, t in zip(preds, labels))
    fp = sum(p == "yes" and t != "yes" for p, t in zip(preds, labels))
    fn = sum(p != "yes" and t == "yes" for p, t in zip(preds, labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    acc = sum(p == t for p, t in zip(preds, labels)) / len(labels) if labels else 0.0
    return {"accuracy": acc, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(p == "yes" for p in preds) / len(preds) if preds else 0.0}


# --- MMMU / MathVista rule-based parsing (the MMMU benchmark's own eval_utils, as the original uses it) ---

def extract_numbers(text: str) -> list[str]:
    with_commas = re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", text)
    scientific = re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", text)
    simple = re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])", text)
    return with_commas + scientific + simple


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def normalize_str(text: str) -> list:
    """A number becomes [float rounded to 2 places]; a one-character string is padded with spaces on
    either side (to avoid trivial matches); other strings are lower-cased."""
    text = text.strip()
    if _is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def parse_multi_choice(response: str, index2ans: dict[str, str], seed: str = "") -> str:
    """The predicted letter: "(B)" first, then "B " / "B.", then (for responses over 5 words) an option's
    text; several candidates -> the last one in the response. No candidate -> a random letter, as the
    MMMU rule does; here seeded by `seed` (the question id) so re-scoring gives the same number."""
    all_choices = list(index2ans)
    for ch in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(ch)
    response = " " + response + " "
    index_ans, with_brackets, candidates = True, False, []
    for c in all_choices:
        if f"({c})" in response:
            candidates.append(c)
            with_brackets = True
    if not candidates:
        candidates = [c for c in all_choices if f"{c} " in response]
    if not candidates:
        candidates = [c for c in all_choices if f"{c}." in response]
    if not candidates and len(response.split()) > 5:
        for c, ans in index2ans.items():
            if ans.lower() in response.lower():
                candidates.append(c)
                index_ans = False
    if not candidates:
        return random.Random(f"mmmu-{seed}").choice(all_choices)
    if len(candidates) == 1:
        return candidates[0]
    if index_ans:
        starts = [response.rfind(f"({c})" if with_brackets else f" {c} ") for c in candidates]
    else:
        starts = [response.lower().rfind(index2ans[c].lower()) for c in candidates]
    return candidates[max(range(len(starts)), key=lambda i: (starts[i], -i))]


def parse_open(response: str) -> list:
    """Candidate answers of a free-form response: the tail after key phrases ("so ", "is ", "answer ",
    ... and "=" in the last sentence), the numbers in them, each normalised (normalize_str)."""
    def key_subresponses(resp: str) -> list[str]:
        resp = resp.strip().strip(".").lower()
        subs = re.split(r"\.\s(?=[A-Z])|\n", resp)
        indicators = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
        keys = []
        for i, sub in enumerate(subs):
            if i == len(subs) - 1:
                indicators = indicators + ["="]
            shortest = None
            for ind in indicators:
                if ind in sub:
                    tail = sub.split(ind)[-1].strip()
                    if not shortest or len(tail) < len(shortest):
                        shortest = tail
            if shortest and shortest.strip() not in [":", ",", ".", "!", "?", ";", ":", "'"]:
                keys.append(shortest)
        return keys or [resp]

    keys = key_subresponses(response)
    preds = list(keys)
    for k in keys:
        preds.extend(extract_numbers(k))
    out = []
    for p in preds:
        for n in normalize_str(p):
            if n not in out:
                out.append(n)
    return out


def eval_open(gold: str | Sequence[str], preds: list) -> float:
    """1 when a parsed string prediction contains a normalised gold string, or a parsed number equals a
    normalised gold number."""
    golds = [gold] if isinstance(gold, str) else list(gold)
    norm = [n for g in golds for n in normalize_str(str(g))]
    for p in preds:
        if isinstance(p, str):
            if any(isinstance(n, str) and n in p for n in norm):
                return 1.0
        elif p in norm:
            return 1.0
    return 0.0
