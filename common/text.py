"""The words of the reports we generate."""


def counted(n, noun: str, plural: str = "", fmt: str = "") -> str:
    """``n`` and its noun, singular when ``n`` is 1 ("1 seed", "3 seeds"): reports said "1 seeds". ``plural``
    where it is not ``noun`` + "s"; ``fmt`` formats ``n`` (``","``: 12,000)."""
    shown = format(n, fmt) if fmt and isinstance(n, (int, float)) else n
    return f"{shown} {noun if n == 1 else plural or noun + 's'}"
