"""Per-program partial rows summed by one program, in a fixed order (deterministic): the helper of the kernels that
reduce a launch's partials this way (routers/triton_topk.py's aux losses, moe/triton_stats.py's routing statistics).
Here, not beside the MoE core, because routers sit below it (tests/test_architecture.py). Not a router."""
import triton
import triton.language as tl


@triton.jit
def column_sums(partials, first, count, width, offset, BLOCK_P: tl.constexpr, BLOCK: tl.constexpr):
    """[BLOCK] float32: the sum over rows first .. first + count - 1 of partials[row * width + offset + (0 .. BLOCK-1)],
    BLOCK_P rows at a time."""
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, count, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        at = partials + (first + rows).to(tl.int64)[:, None] * width + offset + cols[None, :]
        acc += tl.sum(tl.load(at, mask=(rows < count)[:, None], other=0.0), 0)
    return acc
