"""A plain-Python reference of llama.cpp's SentencePiece ("llama") tokenizer, written from ``src/llama-vocab.cpp``.

Only for tests: slow, and written to be checked by eye against llama.cpp's
``llama_vocab::impl::tokenize`` (case LLAMA_VOCAB_TYPE_SPM),
``tokenizer_st_partition`` and ``llm_tokenizer_spm_session``:

* special tokens: with ``parse_special``, every control, unknown and
  user-defined token (else only user-defined ones), longest (in bytes)
  first, each one cut out of every piece of raw text left, left to right;
* each raw piece: a space put first when ``add_space_prefix`` and the piece
  is first or follows a special token; spaces -> ``▁``; symbols are the
  characters; the adjacent pair whose concatenation is a token with the
  highest score merges first, leftmost among equal scores;
* a final symbol that is not a token -> the ``<0xNN>`` tokens of its bytes,
  else the token of that single byte, else llama.cpp throws (KeyError here).

:func:`merge_naively` is the rule itself, rescanning after every merge;
:func:`merge_like_llama_cpp` is llama.cpp's priority queue with stale
entries skipped, fast enough for long texts. Tests check that they agree.
"""

from __future__ import annotations

import heapq

METASPACE = "\u2581"
_KEPT_WHOLE = (2, 3, 4)  # unknown, control, user-defined
_USER_DEFINED = 4


def merge_naively(text: str, token_ids: dict[str, int], scores: list[float]) -> list[str]:
    """The final symbols: merge the best pair (highest score, then leftmost) until no pair is a token."""
    symbols = list(text)
    while True:
        best = None
        for index in range(len(symbols) - 1):
            token_id = token_ids.get(symbols[index] + symbols[index + 1])
            if token_id is not None and (best is None or scores[token_id] > best[0]):
                best = (scores[token_id], index)
        if best is None:
            return symbols
        index = best[1]
        symbols[index : index + 2] = [symbols[index] + symbols[index + 1]]


def merge_like_llama_cpp(text: str, token_ids: dict[str, int], scores: list[float]) -> list[str]:
    """The final symbols, by llama.cpp's work queue over a linked list of symbols."""
    symbols = list(text)  # symbol i's text; "" once merged into its left neighbour
    following = list(range(1, len(symbols))) + [-1]
    previous = list(range(-1, len(symbols) - 1))
    queue: list[tuple[float, int, int, int]] = []  # (-score, left, right, length): best score, then leftmost

    def try_add_bigram(left: int, right: int) -> None:
        if left == -1 or right == -1:
            return
        merged = symbols[left] + symbols[right]
        token_id = token_ids.get(merged)
        if token_id is not None:
            heapq.heappush(queue, (-scores[token_id], left, right, len(merged)))

    for index in range(1, len(symbols)):
        try_add_bigram(index - 1, index)
    while queue:
        _, left, right, length = heapq.heappop(queue)
        if not symbols[left] or not symbols[right] or len(symbols[left]) + len(symbols[right]) != length:
            continue  # one of the two has been merged since
        symbols[left] += symbols[right]
        symbols[right] = ""
        following[left] = following[right]
        if following[right] >= 0:
            previous[following[right]] = left
        try_add_bigram(previous[left], left)
        try_add_bigram(left, following[left])
    return [symbol for symbol in symbols if symbol]


def partition(text: str, tokens: list[str], types: list[int], parse_special: bool = True) -> list[str | int]:
    """The text cut into raw pieces (str) and special token ids (int), as tokenizer_st_partition cuts it."""
    wanted = _KEPT_WHOLE if parse_special else (_USER_DEFINED,)
    specials = [token_id for token_id, kind in enumerate(types) if kind in wanted]
    specials.sort(key=lambda token_id: -len(tokens[token_id].encode("utf-8")))  # stable: ids in order among equals
    fragments: list[str | int] = [text] if text else []
    for token_id in specials:
        special = tokens[token_id]
        cut: list[str | int] = []
        for fragment in fragments:
            if isinstance(fragment, int):
                cut.append(fragment)
                continue
            start = 0
            while (found := fragment.find(special, start)) != -1:
                if found > start:
                    cut.append(fragment[start:found])
                cut.append(token_id)
                start = found + len(special)
            if start < len(fragment):
                cut.append(fragment[start:])
        fragments = cut
    return fragments


def llama_cpp_tokenize(
    text: str,
    tokens: list[str],
    scores: list[float],
    types: list[int],
    add_space_prefix: bool = True,
    parse_special: bool = True,
    naive: bool = False,
) -> list[int]:
    """llama.cpp's ids for ``text`` (add_special=False: no bos)."""
    token_ids = {token: token_id for token_id, token in enumerate(tokens)}
    merge = merge_naively if naive else merge_like_llama_cpp
    output: list[int] = []
    previous_is_special = True
    for fragment in partition(text, tokens, types, parse_special):
        if isinstance(fragment, int):
            output.append(fragment)
            previous_is_special = True
            continue
        if add_space_prefix and previous_is_special:
            fragment = " " + fragment
        for symbol in merge(fragment.replace(" ", METASPACE), token_ids, scores):
            if symbol in token_ids:
                output.append(token_ids[symbol])
                continue
            for byte in symbol.encode("utf-8"):
                byte_token = f"<0x{byte:02X}>"
                output.append(token_ids[byte_token] if byte_token in token_ids else token_ids[chr(byte)])
        previous_is_special = False
    return output
