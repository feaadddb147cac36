"""Placeholder loader (the C++ owner replaces this with the AOT + JIT loader)."""
_state = {"loaded": None, "msg": "not loaded yet"}


def load() -> bool:
    if _state["loaded"] is None:
        try:
            from . import _C  # noqa: F401

            _state.update(loaded=True, msg="AOT extension loaded")
        except Exception as exc:  # noqa: BLE001
            _state.update(loaded=False, msg=f"pni_fast._C not importable: {exc}")
    return bool(_state["loaded"])


def available() -> bool:
    return load()


def has_cuda() -> bool:
    return False


def status_message() -> str:
    load()
    return _state["msg"]
