"""Tokenizers built with no downloaded files, one token per caption word: the tiny text-to-image pipelines of the
shipped teachers (``train_shapes_t2i_teacher.py``) and of the tests use them in place of CLIP's, T5's and Gemma's
downloaded vocabularies."""

from __future__ import annotations


def word_tokenizer(words: list[str], model_max_length: int) -> object:
    """A CLIP BPE tokenizer built with no downloaded files: the byte-level alphabet (and its end-of-word forms)
    plus one merge chain per word of ``words``, so that each is one token; other words fall back to pieces.
    Longer words should come first: a short word's merges ranked earlier can split a longer one."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    merges = []
    for word in words:
        pieces = [*word[:-1], word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            merges.append((merged, piece))
            merged += piece
            vocab.setdefault(merged, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    for word in words:
        pieces = tokenizer.tokenize(word)
        if pieces != [word + "</w>"]:
            raise RuntimeError(f"caption word {word!r} tokenizes as {pieces}; reorder the merges")
    return tokenizer


def _unigram_word_model(words: list[str], specials: list[str], unk: str, template: str):
    """A SentencePiece-style unigram model with ``specials`` first, one piece per word of ``words`` (``"▁red"``, as
    SentencePiece writes a word that follows a space) and those words' single characters as a fallback; each
    sequence is wrapped by ``template`` (``"<bos> $A"``, ``"$A </s>"``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    characters = sorted({c for word in words for c in word} | {"▁"})
    pieces = [(special, 0.0) for special in specials]
    pieces += [("▁" + word, -1.0) for word in words] + [(c, -10.0) for c in characters]
    model = Tokenizer(models.Unigram(pieces, unk_id=specials.index(unk)))
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    model.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    wrapping = [token for token in template.split() if token != "$A"]
    model.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(token, specials.index(token)) for token in wrapping])
    return model


def _check_words(tokenizer, words: list[str]) -> None:
    for word in words:
        if tokenizer.tokenize(word) != ["▁" + word]:
            raise RuntimeError(f"caption word {word!r} tokenizes as {tokenizer.tokenize(word)}")


def t5_word_tokenizer(words: list[str], model_max_length: int = 512) -> object:
    """A T5 tokenizer built with no downloaded files: T5's ``<pad>``, ``</s>``, ``<unk>`` and one unigram piece per
    word of ``words`` (each word is one token), sequences ending in ``</s>``."""
    from transformers import T5TokenizerFast

    model = _unigram_word_model(words, ["<pad>", "</s>", "<unk>"], "<unk>", "$A </s>")
    tokenizer = T5TokenizerFast(tokenizer_object=model, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                extra_ids=0, model_max_length=model_max_length)
    _check_words(tokenizer, words)
    return tokenizer


def gemma_word_tokenizer(words: list[str], model_max_length: int = 512) -> object:
    """A tokenizer in the form of Gemma's (Sana's text encoder) built with no downloaded files: Gemma's ``<pad>``,
    ``<eos>``, ``<bos>``, ``<unk>`` and one unigram piece per word of ``words``, sequences starting with
    ``<bos>``. It is a generic ``PreTrainedTokenizerFast``: ``GemmaTokenizerFast`` rebuilds Gemma's own BPE model
    when loaded, which this vocabulary is not."""
    from transformers import PreTrainedTokenizerFast

    model = _unigram_word_model(words, ["<pad>", "<eos>", "<bos>", "<unk>"], "<unk>", "<bos> $A")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<bos>", eos_token="<eos>",
                                        unk_token="<unk>", pad_token="<pad>", model_max_length=model_max_length)
    _check_words(tokenizer, words)
    return tokenizer
