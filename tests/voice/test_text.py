"""Text handling: the clause splitter, transcript truncation to the audio heard, and WER."""

from tests.voice.conftest import closest
from voice.clauses import ClauseSplitter, speakable
from voice.conversation import Conversation, Item
from voice.wer import edit_distance, normalize, number_words, wer


def split(tokens, **kw):
    s = ClauseSplitter(**kw)
    out = [c for t in tokens for c in s.feed(t)]
    if rest := s.flush():
        out.append(rest)
    return out


def test_clauses_cut_at_sentence_ends_and_first_clause_early():
    tokens = ["The", " capital", " of", " France", " is", " Paris", ".", " It", " is", " lovely", " in", " spring", "."]
    out = split(tokens, first_words=3)
    assert out == [("The capital of", False), ("France is Paris.", True), ("It is lovely in spring.", True)]
    assert "".join(tokens).split() == " ".join(c for c, _ in out).split()  # nothing lost or repeated


def test_a_word_is_not_cut_before_it_is_complete():
    s = ClauseSplitter(first_words=2)
    assert s.feed("Hello wor") == []  # "wor" may continue
    assert s.feed("ld again") == [("Hello world", False)]


def test_clause_punctuation_needs_a_few_words_and_numbers_keep_their_point():
    out = split(["Yes, it costs 3.5 dollars, more or less; ask again"], first_words=0, min_clause_words=3)
    assert out == [("Yes, it costs 3.5 dollars,", False), ("more or less;", False), ("ask again", True)]


def test_markdown_is_not_spoken():
    assert speakable("1. **Sleep** well\n- `now` # ok") == "Sleep well now ok"
    assert split(["**Bold** text.\n\n2. Next"], first_words=0) == [("Bold text.", True), ("Next", True)]


def test_truncation_keeps_the_words_whose_audio_was_heard():
    item = Item("i", "assistant", audio=True, clauses=[("one two three four", 400), ("five six", 200)])
    assert item.text_until(600) == "one two three four five six"
    assert item.text_until(400) == "one two three four"
    assert item.text_until(200) == "one two"
    assert item.text_until(500) == "one two three four five"
    assert item.text_until(0) == ""


def test_conversation_messages_keep_a_stable_prefix():
    conv = Conversation()
    conv.add(Item("a", "user", text="hi"))
    conv.add(Item("b", "assistant", text="hello"))
    first = conv.messages("be brief")
    conv.add(Item("c", "user", text="again"))
    assert conv.messages("be brief")[: len(first)] == first
    assert conv.messages("be brief")[0] == {"role": "system", "content": "be brief"}
    conv.add(Item("d", "user", text=None, audio=True))  # still being transcribed: not sent to the model
    assert len(conv.messages("")) == 3


def test_wer_normalisation_and_counts():
    assert number_words(1999) == "one thousand nine hundred ninety nine"
    assert normalize("It's 8 legs, 50%!") == ["it's", "eight", "legs", "fifty", "percent"]
    assert edit_distance("a b c".split(), "a x c d".split()) == 2
    assert wer(["How many legs does a spider have?"], ["how many legs does a spider have"]) == 0
    assert wer(["one two three four"], ["one too three"]) == 0.5
    assert wer(["a b", "c d e f"], ["a b", "c"]) == 0.5  # corpus WER: 3 edits over 6 words


def test_closest_sentence_in_a_closed_set():
    options = ("What is the capital of France?", "How many legs does a spider have?")
    assert closest("what is the capital and friends", options) == options[0]
    assert closest("how many lands does a spider ham", options) == options[1]
