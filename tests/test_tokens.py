import pytest

from attnctl.errors import TokenError
from attnctl.tokenizers import build_clip_tokenizer, build_t5_tokenizer
from attnctl.tokens import find_phrase


@pytest.fixture(scope="module")
def clip():
    return build_clip_tokenizer()


def test_words_phrases_and_repeats(clip):
    prompt = "a red circle and a blue circle"
    assert find_phrase(clip, prompt, "red") == [2]
    assert find_phrase(clip, prompt, "circle") == [3, 7]  # every occurrence
    assert find_phrase(clip, prompt, "circle#2") == [7]
    assert find_phrase(clip, prompt, "blue circle") == [6, 7]
    pieces = clip.tokenize("zebra")
    assert len(pieces) > 1  # not in the vocabulary: several tokens, all of them returned
    assert find_phrase(clip, "a zebra", "zebra") == list(range(2, 2 + len(pieces)))


def test_errors_show_the_tokenization(clip):
    with pytest.raises(TokenError, match=r"'dog' is not in the prompt.*1:a</w> 2:cat</w>"):
        find_phrase(clip, "a cat", "dog")
    with pytest.raises(TokenError, match="#3 does not exist"):
        find_phrase(clip, "a cat and a cat", "cat#3")
    with pytest.raises(TokenError, match="empty phrase"):
        find_phrase(clip, "a cat", " ")


def test_t5_positions_have_no_start_token():
    t5 = build_t5_tokenizer()
    assert find_phrase(t5, "a red circle", "circle") == [2]


def test_whole_word_tokens_for_every_word(clip):
    from attnctl.tokenizers import DEFAULT_WORDS

    for word in DEFAULT_WORDS:
        assert clip.tokenize(word) == [word + "</w>"]
