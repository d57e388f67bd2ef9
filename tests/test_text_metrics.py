"""Text metrics against known answers: normalisation rules, Recall@K, accuracy, ROUGE-L (hand LCS)."""

import pytest

from userllm_jax.eval import text_metrics as tm


@pytest.mark.parametrize("a,b", [
    ("Shawshank Redemption, The (1994)", "The Shawshank Redemption (1994)"),
    ("Shawshank Redemption, The (1994)", "shawshank redemption (1994)"),
    ("Shawshank Redemption, The (1994)", "THE SHAWSHANK REDEMPTION (1994)  "),
    ("Few Good Men, A (1992)", "A Few Good Men (1992)"),
    ("Haine, La (1995)", "La Haine (1995)"),
    ("City of Lost Children, The (Cité des enfants perdus, La) (1995)",
     "The City of Lost Children (Cité des enfants perdus, La) (1995)"),
    ("Schindler's List (1993)", "Schindlers List (1993)"),
    ("Dr. Strangelove (1963)", "Dr Strangelove (1963)"),
])
def test_normalize_equivalent(a, b):
  assert tm.normalize_title(a) == tm.normalize_title(b)


def test_normalize_exact_forms():
  assert tm.normalize_title("Shawshank Redemption, The (1994)") == "shawshank redemption 1994"
  assert tm.normalize_title("Shawshank Redemption, The (1994)", drop_year=True) == "shawshank redemption"
  # Alternative titles in parentheses are not years and stay.
  assert tm.normalize_title("Seven (Se7en) (1995)") == "seven se7en 1995"
  # Only a leading article is dropped, not one inside the title.
  assert tm.normalize_title("Beauty and the Beast") == "beauty and the beast"
  # "The" as the whole title is not an article followed by words.
  assert tm.normalize_title("Them!") == "them"


def test_normalize_year_distinguishes_remakes():
  assert tm.normalize_title("Hamlet (1996)") != tm.normalize_title("Hamlet (1990)")
  assert (tm.normalize_title("Hamlet (1996)", drop_year=True)
          == tm.normalize_title("Hamlet (1990)", drop_year=True))


def test_normalize_rejects_non_string():
  with pytest.raises(TypeError, match="expected str"):
    tm.normalize_title(None)


def test_recall_at_k_known_answer():
  cands = [
      ["Toy Story (1995)", "Heat (1995)", "Casino (1995)"],    # target at rank 2 (1-based)
      ["Heat (1995)", "Shawshank Redemption, The (1994)"],    # target at rank 2 via normalisation
      ["Heat (1995)", "Casino (1995)", "Fargo (1996)"],       # miss
      ["Fargo (1996)"],                                       # rank 1
  ]
  targets = ["Heat (1995)", "The Shawshank Redemption (1994)", "Toy Story (1995)", "Fargo (1996)"]
  assert tm.recall_at_k(cands, targets, 1) == pytest.approx(1 / 4)
  assert tm.recall_at_k(cands, targets, 2) == pytest.approx(3 / 4)
  assert tm.recall_at_k(cands, targets, 10) == pytest.approx(3 / 4)
  # Without normalisation the article form no longer matches.
  assert tm.recall_at_k(cands, targets, 2, normalize=False) == pytest.approx(2 / 4)
  assert tm.hits_at_k(cands, targets, 2) == [True, True, False, True]
  assert tm.rank_of(cands[1], targets[1]) == 1
  assert tm.rank_of(cands[2], targets[2]) is None


def test_recall_errors():
  with pytest.raises(ValueError, match="2 predictions but 1 targets"):
    tm.recall_at_k([["a"], ["b"]], ["a"], 1)
  with pytest.raises(ValueError, match="k must be >= 1"):
    tm.recall_at_k([["a"]], ["a"], 0)
  with pytest.raises(TypeError, match="list of strings"):
    tm.recall_at_k(["abc"], ["a"], 1)
  with pytest.raises(ValueError, match="no examples"):
    tm.accuracy([], [])


def test_accuracy():
  preds = ["Drama", "comedy", "Action", "Sci-Fi"]
  targets = ["Drama", "Comedy", "Thriller", "sci fi"]
  assert tm.accuracy(preds, targets) == pytest.approx(3 / 4)
  assert tm.accuracy(preds, targets, normalize=False) == pytest.approx(1 / 4)


def test_lcs_hand_computed():
  a = "the cat sat on the mat".split()
  b = "the cat on mat".split()
  assert tm.lcs_length(a, b) == 4
  assert tm.lcs_length("a b c d".split(), "d c b a".split()) == 1
  assert tm.lcs_length("a b c b d a b".split(), "b d c a b a".split()) == 4  # CLRS example
  assert tm.lcs_length([], ["x"]) == 0


def test_rouge_l_known_answers():
  # ref 6 tokens, pred 4 tokens (punctuation/case dropped by the tokenizer), LCS 4.
  out = tm.rouge_l(["The cat, on mat!"], ["the cat sat on the mat"])
  assert out["precision"] == pytest.approx(1.0)
  assert out["recall"] == pytest.approx(4 / 6)
  assert out["fmeasure"] == pytest.approx(2 * 1.0 * (4 / 6) / (1.0 + 4 / 6))
  # Second pair: ref "a b c d", pred "d c b a": LCS 1 -> P = R = F = 1/4; means over 2 examples.
  out = tm.rouge_l(["The cat, on mat!", "d c b a"], ["the cat sat on the mat", "a b c d"])
  assert out["precision"] == pytest.approx((1.0 + 0.25) / 2)
  assert out["recall"] == pytest.approx((4 / 6 + 0.25) / 2)
  assert out["fmeasure"] == pytest.approx((0.8 + 0.25) / 2)
  # Empty prediction scores zero.
  assert tm.rouge_l([""], ["something"])["fmeasure"] == 0.0
