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


def test_qwen_tokenizer_words_are_one_token_bare_and_spaced_and_its_variants_differ_only_as_asked():
    from attnctl.tokenizers import DEFAULT_WORDS, QWEN_SPECIAL, build_qwen_tokenizer

    words = list(DEFAULT_WORDS) + ["Describe", "bottom", "top"]  # a capital; "top" merges inside "bottom"
    spaced = build_qwen_tokenizer(words, eos_token="<|im_end|>", list_chat_tokens=True)
    bare = build_qwen_tokenizer(words, spaced_first=False, list_chat_tokens=False, model_max_length=4096)
    for tokenizer in (spaced, bare):
        for word in words:
            assert tokenizer.tokenize(word) == [word] and tokenizer.tokenize(" " + word) == ["\u0120" + word]
        n = len(tokenizer)
        assert tokenizer.convert_tokens_to_ids(list(QWEN_SPECIAL)) == [n - 3, n - 2, n - 1]  # after the words
        assert tokenizer.tokenize("<|im_start|>circle") == ["<|im_start|>", "circle"]
    assert len(spaced) == len(bare) and set(spaced.get_vocab()) == set(bare.get_vocab())
    assert spaced.convert_tokens_to_ids("\u0120circle") < spaced.convert_tokens_to_ids("circle")
    assert bare.convert_tokens_to_ids("\u0120circle") > bare.convert_tokens_to_ids("circle")
    assert spaced.eos_token == "<|im_end|>" and bare.eos_token == "<|endoftext|>"
    assert set(spaced.all_special_ids) == set(spaced.convert_tokens_to_ids(list(QWEN_SPECIAL)))
    assert bare.all_special_ids == [bare.convert_tokens_to_ids("<|endoftext|>")]
    assert spaced.model_max_length == 512 and bare.model_max_length == 4096 and spaced.chat_template is None
