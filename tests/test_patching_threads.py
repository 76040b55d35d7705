"""The patch layer under threads, out-of-order exits and faults, checked against a snapshot of
every ``sam3.*`` module and class by identity."""

from __future__ import annotations

import inspect
import sys
import threading

import pytest

import sam3_exportable as s3e
from sam3_exportable.patching import engine
from sam3_exportable.patching.engine import PatchSession, installed_patches, resolve_target
from sam3_exportable.patching.selection import patch_by_name, select_patches

RPB = "sam3.model.decoder.TransformerDecoder._get_rpb_matrix"


def _snapshot() -> dict[tuple[str, str], int]:
    """``id()`` of every attribute of every loaded ``sam3.*`` module and of every class they
    define (their own ``__dict__``): any patch left behind or lost shows up."""
    snap: dict[tuple[str, str], int] = {}
    for name, module in sorted(sys.modules.items()):
        if module is None or not (name == "sam3" or name.startswith("sam3.")):
            continue
        for attr, value in vars(module).items():
            snap[(name, attr)] = id(value)
            if inspect.isclass(value) and value.__module__ == name:
                for member, obj in vars(value).items():
                    snap[(f"{name}.{attr}", member)] = id(obj)
    return snap


@pytest.fixture(autouse=True)
def _pristine():
    import sam3.model_builder  # noqa: F401  every patched module loaded before the snapshot

    before = _snapshot()
    assert installed_patches() == {}
    yield
    assert installed_patches() == {}
    assert _snapshot() == before


def _patched(target: str = RPB) -> bool:
    return s3e.is_patched(resolve_target(target)[2])


def test_a_second_thread_keeps_its_patches_when_the_first_leaves() -> None:
    t2_entered, t1_left, t2_checked = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, bool] = {}

    def first() -> None:
        with s3e.exportable_sam3():
            t2_entered.wait(10)
        t1_left.set()

    def second() -> None:
        with s3e.exportable_sam3() as session:
            assert session.active == ()  # shared with the first, not wrapped twice
            t2_entered.set()
            t1_left.wait(10)
            seen["after_t1_left"] = _patched()
            t2_checked.set()
        seen["after_both_left"] = _patched()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    threads[0].start()
    while not installed_patches():
        pass  # the first session is in
    threads[1].start()
    for t in threads:
        t.join(30)
    assert seen == {"after_t1_left": True, "after_both_left": False}


def test_sessions_exited_out_of_order_keep_the_open_ones_patched() -> None:
    outer = s3e.exportable_sam3()
    inner = PatchSession([patch_by_name("decoder.static_rpb_feat_size")])
    outer.apply()
    inner.apply()
    outer.revert()  # the first one in leaves first
    assert _patched() and set(installed_patches()) == {"decoder.static_rpb_feat_size"}
    assert resolve_target(RPB)[2].__wrapped__ is s3e.original_of(resolve_target(RPB)[2])
    inner.revert()
    assert not _patched()


def test_many_threads_entering_and_leaving_at_random() -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        try:
            barrier.wait(10)
            for j in range(25):
                with s3e.exportable_sam3(only=["decoder.static_rpb_feat_size"] if (i + j) % 2 else None):
                    if not _patched():
                        raise AssertionError(f"thread {i} ran unpatched inside its session")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def test_a_failure_half_way_through_applying_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    patches = select_patches()
    real = engine._install
    calls: list[str] = []

    def flaky(state) -> None:
        calls.append(state.target)
        if len(calls) == 3:
            raise RuntimeError("injected failure while applying")
        real(state)

    monkeypatch.setattr(engine, "_install", flaky)
    with pytest.raises(RuntimeError, match="injected failure while applying"):
        PatchSession(patches).apply()
    assert len(calls) == 3


def test_a_failure_half_way_through_reverting_reverts_the_rest_then_retries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    session = s3e.exportable_sam3()
    session.apply()
    real = engine._restore
    failing = "decoder.static_rpb_feat_size"

    def flaky(state) -> None:
        if state.target == RPB:
            raise RuntimeError("injected failure while reverting")
        real(state)

    monkeypatch.setattr(engine, "_restore", flaky)
    with pytest.raises(RuntimeError, match="injected failure while reverting"):
        session.revert()
    assert set(installed_patches()) == {failing}  # every other patch is back to upstream
    monkeypatch.undo()
    with s3e.exportable_sam3(only=[failing]):  # the next holder releases it for good
        assert _patched()


def test_patches_of_one_target_stack_and_leave_in_any_order() -> None:
    target = "sam3.model.model_misc.MultiheadAttentionWrapper.forward"
    inner = PatchSession([patch_by_name("model_misc.sdpa_box_rpb_cross_attention")])  # stack_order 0
    outer = PatchSession([patch_by_name("model_misc.contiguous_in_projection_under_autocast")])
    original = resolve_target(target)[2]
    outer.apply()
    inner.apply()
    value = resolve_target(target)[2]
    assert value._self_sam3_exportable_patch.name == "model_misc.contiguous_in_projection_under_autocast"
    assert value.__wrapped__._self_sam3_exportable_patch.name == "model_misc.sdpa_box_rpb_cross_attention"
    assert s3e.original_of(value) is original
    outer.revert()  # the outer one leaves first: the inner one stays, rebuilt on the original
    value = resolve_target(target)[2]
    assert value._self_sam3_exportable_patch.name == "model_misc.sdpa_box_rpb_cross_attention"
    assert value.__wrapped__ is original
    inner.revert()
    assert resolve_target(target)[2] is original
