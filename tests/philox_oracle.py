"""Old name of the numpy RNG oracle, kept for the modules and docs that still import it.

The oracle lives in tests/oracle.py (one module: the numpy Philox, the float64 op contract,
the bounds and the cases); this re-exports its RNG part unchanged.
"""

from oracle import (  # noqa: F401
    KNOWN_ANSWERS,
    normal,
    normal_at,
    normal_from_words,
    philox4x32_10,
    philox4x32_rounds,
    uniform,
    words,
)
