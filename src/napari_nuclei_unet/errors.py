"""Exceptions whose message is a complete one-line explanation for the user.

The CLI prints ``str(error)`` of these and exits; the widgets show it as a notification.
Messages name the file (and row, where there is one) and the problem.
"""


class NucleiUnetError(Exception):
    """Base class: an expected failure with a user-facing message."""


class InputError(NucleiUnetError):
    """An image or label file that can't be read or doesn't make sense."""


class RLEError(InputError):
    """A malformed run-length encoding or RLE CSV."""


class ModelError(NucleiUnetError):
    """Weights or checkpoints that can't be loaded."""


class Cancelled(NucleiUnetError):
    """Long work stopped at the user's request."""


def stop_if_cancelled(cancel) -> None:
    """Raise :class:`Cancelled` when ``cancel()`` (a callable, or None: never) says the user asked to stop."""
    if cancel is not None and cancel():
        raise Cancelled("segmentation cancelled")


def describe(error: BaseException, limit: int = 200) -> str:
    """``"TypeName: first line of the message"``, for one-line reports; never raises itself.

    Error handlers call this instead of ``str(error).splitlines()[0]``, which fails on an
    empty message (and ``str`` can fail on a broken exception object).
    """
    try:
        text = str(error)
    except Exception:  # noqa: BLE001 (a broken __str__ must not break the report)
        text = ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    name = type(error).__name__
    return f"{name}: {lines[0][:limit]}" if lines else name


def available_memory() -> int:
    """Bytes of memory this process can still allocate without swapping (MemAvailable), best known."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import os

    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # not on this platform (macOS, Windows)
        return 1 << 40  # unknown: let the allocation itself fail (MemoryError is caught by the callers)


def check_allocation(nbytes: float, what: str, source: object) -> None:
    """Raise :class:`InputError` before allocating ``nbytes`` that a file declares but memory can't hold."""
    available = available_memory()
    if nbytes > available:
        raise InputError(
            f"{source}: {what} would need {nbytes / 2**30:.3g} GiB, more than the {available / 2**30:.3g} GiB of "
            "memory available"
        )


def nuclei_text(count: int) -> str:
    """``"1 nucleus"``, ``"12 nuclei"``: counts as users read them."""
    return f"{count} nucleus" if count == 1 else f"{count} nuclei"
