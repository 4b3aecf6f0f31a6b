"""Byte-level model of the stores in merge-boundary-chunks.patch: every q/k element of a packed
qkv is written exactly once, and nothing else is, for every start offset, row misalignment,
heads per token and head size of the per-size chunks instances. Elements, not bytes: a chunk is
8 elements. Run: python3 docs/experiments/merge_boundary_chunks_model.py"""


def check(tokens, heads, head_dim, row_extra, offset, lanes):
    groups = 32 // lanes  # heads a warp holds; a block's first head is a multiple of this
    row = heads * head_dim + 8 + row_extra  # q | k, then v and padding that must stay untouched
    total = tokens * heads
    half = head_dim // 2
    writes = {}

    def store(at, count):
        for e in range(at, at + count):
            writes[e] = writes.get(e, 0) + 1

    for item in range(total):
        token, head = divmod(item, heads)
        group = item % groups
        src = offset + token * row + head * head_dim
        shift = src % 8
        base = src - shift
        merge_first = head != 0 and group != 0
        partial_tail = not (item + 1 < total and head + 1 < heads and group + 1 < groups)
        for k in range(head_dim // 16):
            edge = shift if k == 0 else 0
            store(base + half + k * 8, 8)
            if edge and not merge_first:
                store(base + k * 8 + edge, 8 - edge)
            else:
                store(base + k * 8, 8)
            if edge and partial_tail:
                store(base + 2 * half, edge)
    for token in range(tokens):
        start = offset + token * row
        for e in range(start, start + heads * head_dim):
            assert writes.get(e) == 1, (tokens, heads, head_dim, row_extra, offset, e)
    assert sum(writes.values()) == total * head_dim, "an element outside q and k was written"


if __name__ == "__main__":
    cases = 0
    for lanes, head_dim in ((8, 128), (4, 64), (16, 256)):
        for heads in (1, 2, 3, 5, 7, 40):
            for tokens in (1, 2, 3, 37):
                for row_extra in range(8):
                    for offset in range(8):
                        check(tokens, heads, head_dim, row_extra, offset, lanes)
                        cases += 1
    print(f"every element written once in {cases} layouts")
