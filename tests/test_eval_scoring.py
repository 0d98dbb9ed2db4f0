"""Each benchmark scoring rule on hand-made cases whose scores are worked out by hand."""

import pytest

from oq2vl_jax.eval import benchmarks as B
from oq2vl_jax.eval import scoring as S
from oq2vl_jax.eval.data import Question


@pytest.mark.parametrize("raw,norm", [
    ("Two", "2"), ("two dogs", "2 dogs"), ("none", "0"), ("yes.", "yes"), ("Yes", "yes"),
    ("the dog", "dog"), ("a cat", "cat"), ("An apple", "apple"), ("dont", "don't"), ("isnt", "isn't"),
    ("hot-dog", "hot dog"), ("3.5", "3.5"), ("3,000", "3000"), ("red, white", "red white"),
    ("what?", "what"), ("  left \n", "left"), ("man's hat", "man 's hat"),
])
def test_vqa_normalisation_maps_variants_to_one_form(raw, norm):
    assert S.vqa_normalize(raw) == norm


def test_vqa_accuracy_is_the_leave_one_annotator_out_mean():
    assert S.vqa_accuracy("Two", ["2"] * 10) == 1.0
    assert S.vqa_accuracy("yes.", ["yes"] * 10) == 1.0
    assert S.vqa_accuracy("The dog", ["dog"] * 10) == 1.0
    assert S.vqa_accuracy("dont know", ["don't know"] * 10) == 1.0
    # 3 of 10 say "cat": 3 subsets hold 2 cats (2/3), 7 hold 3 (1) -> (3 * 2/3 + 7) / 10
    assert S.vqa_accuracy("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(0.9)
    # 1 of 10: nine subsets hold it once (1/3), one not at all -> 0.3
    assert S.vqa_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)
    assert S.vqa_accuracy("dog", ["cat"] * 3 + ["dog"] * 7) == 1.0
    assert S.vqa_accuracy("bird", ["cat"] * 10) == 0.0
    # a single annotator leaves nobody to agree with: the official formula gives 0
    assert S.vqa_accuracy("cat", ["cat"]) == 0.0


def test_vqa_output_postprocessing_strips_like_the_original():
    assert S.vqa_output("Yes.\n") == "yes"
    assert S.vqa_output("Red, blue") == "red blue"
    # the original's post-processing drops every period, so 2.5 becomes 25 before normalisation
    assert S.vqa_output("2.5") == "25"


def test_gqa_exact_match_after_normalisation_and_the_originals_stricter_check():
    q = Question("1", "q", [], answer="dog")
    assert B.score_gqa(q, {"output": "The dog."}) == {"accuracy": 1.0, "accuracy_original": 0.0}
    assert B.score_gqa(q, {"output": "Dog"}) == {"accuracy": 1.0, "accuracy_original": 1.0}
    assert B.score_gqa(q, {"output": "dogs"}) == {"accuracy": 0.0, "accuracy_original": 0.0}


def test_multiple_choice_substring_check_and_strict_letter():
    # the original's substring check: case-insensitive for MMBench/SEED, so "a cat" counts as A
    assert S.mc_substring("a cat", "A") == 1.0 and S.mc_substring("a cat", "A", case_sensitive=True) == 0.0
    assert S.mc_substring("B", "B") == 1.0 and S.mc_substring("C", "B") == 0.0
    for out, letter in [("B", "B"), ("B.", "B"), ("(C) text", "C"), ("D) x", "D"), ("A: yes", "A"), (" A", "A"),
                        ("Because", None), ("a", None), ("", None), ("AB", None)]:
        assert S.mc_letter(out) == letter, out
    q = Question("1", "q", [], ["x", "y"], "A")
    assert B.score_mc(False)(q, {"output": "a cat"}) == {"accuracy": 1.0, "strict": 0.0}
    assert B.score_mc(True)(q, {"output": "a cat"}) == {"accuracy": 0.0, "strict": 0.0}
    assert B.score_mc(False)(q, {"output": "A."}) == {"accuracy": 1.0, "strict": 1.0}


def test_likelihood_picks_the_most_probable_letter():
    q = Question("1", "q", [], ["w", "x", "y", "z"], "B")
    assert B.score_likelihood(q, {"probs": [0.1, 0.6, 0.2, 0.1]}) == {"accuracy": 1.0}
    assert B.score_likelihood(q, {"probs": [0.4, 0.3, 0.2, 0.1]}) == {"accuracy": 0.0}


def test_pope_yes_no_parsing_and_metrics_per_category():
    assert [S.yes_no(o) for o in ["Yes.", ",no", "No,", "yes, there is", "Yes there is"]] == \
        ["yes", "no", "no", "yes, there is", "yes there is"]
    # yes is positive: tp=1 fp=1 fn=2 ("no", and the unparsable "maybe" counts as not-yes)
    m = S.binary_metrics(["yes", "yes", "no", "no", "maybe"], ["yes", "no", "yes", "no", "yes"])
    assert m["accuracy"] == pytest.approx(2 / 5) and m["precision"] == 0.5
    assert m["recall"] == pytest.approx(1 / 3) and m["f1"] == pytest.approx(0.4)
    pope = B.REGISTRY["pope"]
    qs = [Question(str(i), "q", [], answer=a, meta={"category": c}) for i, (a, c) in
          enumerate([("yes", "random"), ("no", "random"), ("yes", "popular"), ("no", "popular")])]
    outs = ["Yes.", "yes", "yes", "No"]  # random: 1/2 right; popular: 2/2 right
    metrics = pope.metrics(qs, [pope.score(q, {"output": o}) for q, o in zip(qs, outs)])
    assert metrics["random/accuracy"] == 0.5 and metrics["popular/accuracy"] == 1.0
    assert metrics["accuracy"] == 0.75  # mean over the categories
    assert metrics["random/f1"] == pytest.approx(2 / 3) and metrics["f1"] == pytest.approx((2 / 3 + 1) / 2)


def test_mmmu_multiple_choice_parsing_rules():
    opts = {"A": "blue one", "B": "red one", "C": "green", "D": "white"}
    assert S.parse_multi_choice("(B) because", opts) == "B"
    assert S.parse_multi_choice("The answer is C.", opts) == "C"
    assert S.parse_multi_choice("A or B", opts) == "B"  # several candidates: the last one wins
    assert S.parse_multi_choice("I think it is definitely the red one here", opts) == "B"  # option text, > 5 words
    # nothing to parse: a random letter, the same one every time for the same question id
    picks = {S.parse_multi_choice("no idea", opts, seed=str(i)) for i in range(40)}
    assert picks == set(opts) and S.parse_multi_choice("no idea", opts, seed="7") == \
        S.parse_multi_choice("no idea", opts, seed="7")


def test_mmmu_open_answer_parsing_rules():
    assert S.eval_open("3.5", S.parse_open("The answer is 3.50")) == 1.0
    assert S.eval_open("1,000", S.parse_open("so it is 1000")) == 1.0
    assert S.eval_open("cat", S.parse_open("a cat")) == 1.0
    assert S.eval_open("2", S.parse_open("two")) == 0.0  # no number words in this rule
    assert S.eval_open(["7", "seven"], S.parse_open("x = 7")) == 1.0
    assert S.eval_open("8", S.parse_open("therefore 7")) == 0.0
    mmmu = B.REGISTRY["mmmu"]
    mc = Question("1", "q", [], ["1", "2", "3"], "C")
    assert mmmu.score(mc, {"output": "C"}) == {"accuracy": 1.0}
    assert mmmu.score(Question("2", "q", [], answer="12"), {"output": "12"}) == {"accuracy": 1.0}
