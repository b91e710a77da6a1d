"""A stand-in that fails on a chosen call, for the tests that cut a long computation short."""


class FailOnCall:
    """Patches `owner.name` (and the same name on each of `also`, for a function re-exported
    elsewhere) with a counting wrapper of the real function that raises `error` on call number
    `at` (None: never). `calls` counts every call; set `at` again to fail at another call."""

    def __init__(self, monkeypatch, owner, name: str, at: int | None = None, error=KeyboardInterrupt, also=()):
        self.real, self.calls, self.at, self.error = getattr(owner, name), 0, at, error
        for o in (owner, *also):
            monkeypatch.setattr(o, name, self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise self.error()
        return self.real(*args, **kwargs)
