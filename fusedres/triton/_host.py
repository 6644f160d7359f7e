"""Integer helpers for the host side of the Triton kernels (launch grids, workspace sizes, block sizes).

triton.cdiv and triton.next_power_of_2 are constexpr functions: called from Python they cost ~2 us each
(triton 3.6 and 3.8), and a conv launch sizes its grid and workspace for every autotuning config.
"""


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints, b > 0."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1
