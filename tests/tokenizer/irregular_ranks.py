"""A merge table whose order of single merges is observable, shared by the merge-loop tests.

Ids 0..3 are "bytes". The pair (4, 0) has rank 0, lower than the rank (1) of
the merge that produces its left token 4 = 0 + 1, so merges do not happen in
order of creation; and the merged ids (4..9) collide with byte ids 4..9.
Maps (left, right) -> (rank, merged id).
"""

IRREGULAR_RANKS = {
    (4, 0): (0, 6),
    (0, 1): (1, 4),
    (1, 1): (2, 5),
    (4, 4): (3, 7),
    (5, 2): (4, 8),
    (2, 3): (5, 9),
}
