"""Human-readable units for the numbers nnxtrain prints: bytes in binary units.

    format_bytes(3 * 1024**3)  # '3.000 GiB'

The trainer, memstats and the sharding printer all print sizes this one way.
"""


def format_bytes(n: float | None) -> str:
    """Bytes in the largest binary unit (up to GiB) that keeps the number >= 1; '-' for None."""
    if n is None:
        return "-"
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.3f} {unit}"
    return f"{n / 1024:.3f} GiB"
