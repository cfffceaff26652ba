"""The one boundary: `Controls` are strict and refuse whole, and both backends implement every member of the
`Backend` protocol with its signature (no duck typing, no faked attributes)."""

import inspect

import pytest

from engine import Backend, Controls, Engine
from engine.backend import ControlError
from serve.remote import RemoteEngine


def test_controls_are_strictly_typed_and_name_what_they_refuse():
    assert Controls(mode="batched", max_batch_size=8).to_json() == {"mode": "batched", "max_batch_size": 8}
    assert Controls.from_json({"speculation": False}) == Controls(speculation=False)
    for body, name in (({"max_batch_size": True}, "max_batch_size"), ({"mode": "turbo"}, "mode"),
                       ({"speculation": 1}, "speculation"), ({"warp": 9}, "warp"), ({"chunked_prefill": "yes"},
                                                                                     "chunked_prefill")):
        with pytest.raises(ControlError) as e:
            Controls.from_json(body)
        assert e.value.name == name


def protocol_members() -> dict[str, inspect.Signature | None]:
    """Backend's methods with their signatures, and its attributes (None)."""
    members = {name: inspect.signature(fn) for name, fn in vars(Backend).items()
               if callable(fn) and not name.startswith("_")}
    members |= dict.fromkeys(Backend.__annotations__)
    return members


@pytest.mark.parametrize("backend", [Engine, RemoteEngine])
def test_each_backend_implements_the_protocol(backend):
    for name, signature in protocol_members().items():
        if signature is None:  # an attribute: set in __init__ (read it from the source, as no instance is made here)
            assert f"self.{name}" in inspect.getsource(backend.__init__) + inspect.getsource(backend), name
        else:
            assert str(inspect.signature(getattr(backend, name))) == str(signature), name


def test_a_running_engine_is_a_backend_and_applies_controls_all_or_nothing(tiny_loaded):
    engine = Engine(tiny_loaded, quant="none", spec="off")
    try:
        with pytest.raises(ControlError, match="--spec off"):
            engine.control(Controls(mode="batched", speculation=True))
        assert engine.snapshot().state.mode == "latency"  # the refused control changed nothing
        engine.control(Controls(mode="batched"))
        state = engine.snapshot().state  # applied when control returns
        assert state.mode == "batched" and state.kv is not None and not state.can_speculate
    finally:
        engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.control(Controls(mode="latency"))
