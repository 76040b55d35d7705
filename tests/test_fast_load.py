"""The fast ``.pt2`` loader: same program as ``torch.export.load``, scoped patches, fallback."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import zipfile
from pathlib import Path

import pytest
import sympy
import torch
import torch._export.serde.serialize as serialize
import torch._export.serde.union as union
from conftest import assert_bitwise, example_inputs
from torch._export.serde import schema
from torch.export.pt2_archive import _package

from sam3_exportable.artifact import fast_load, load_pipeline, manifest_path, save_pipeline, sha256_file
from sam3_exportable.artifact.fast_load import (
    FastLoadUnavailable,
    _Memo,
    _memo_get_type_hints,
    _memo_sympify,
    _SchemaDecoder,
    fast_load_scope,
    load_program,
)
from sam3_exportable.errors import ArtifactError
from sam3_exportable.patching.engine import installed_patches


def _patched_names() -> dict[str, object]:
    return {
        "serialize.typing": serialize.typing,
        "serialize.sympy": serialize.sympy,
        "serialize.dataclasses": serialize.dataclasses,
        "serialize._dict_to_dataclass": serialize._dict_to_dataclass,
        "union.fields": union.fields,
        "_package._build_file_map": _package._build_file_map,
    }


ORIGINALS = _patched_names()


@pytest.fixture(scope="module")
def saved(tiny_ep, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fast") / "tiny.pt2"
    save_pipeline(tiny_ep, path)
    return path


@pytest.fixture(scope="module")
def plain(saved: Path) -> torch.export.ExportedProgram:
    return torch.export.load(saved)


def _readable(ep: torch.export.ExportedProgram) -> str:
    return ep.graph_module.print_readable(print_output=False)


def test_fast_load_is_the_program_torch_loads(saved: Path, plain) -> None:
    with fast_load_scope(saved) as mapped:
        fast = torch.export.load(saved)
    assert mapped is not None and mapped.mapped_records > 0
    assert _package._build_file_map is ORIGINALS["_package._build_file_map"]

    assert str(fast.graph_module.code) == str(plain.graph_module.code)
    assert _readable(fast) == _readable(plain)  # includes the nested (higher-order op) graphs
    assert fast.graph_signature == plain.graph_signature
    assert fast.range_constraints == plain.range_constraints
    assert str(fast.module_call_graph) == str(plain.module_call_graph)
    assert fast.state_dict.keys() == plain.state_dict.keys()
    for name, want in plain.state_dict.items():
        got = fast.state_dict[name]
        assert type(got) is type(want), name
        assert (got.dtype, got.shape, got.stride(), got.storage_offset(), got.requires_grad) == (
            want.dtype,
            want.shape,
            want.stride(),
            want.storage_offset(),
            want.requires_grad,
        ), name
        assert torch.equal(got, want), name
    assert fast.constants.keys() == plain.constants.keys()
    for name, want in plain.constants.items():
        assert torch.equal(fast.constants[name], want), name
    # weights that shared a record in the file still share storage
    plain_groups = {n: t.untyped_storage().data_ptr() for n, t in plain.state_dict.items()}
    fast_groups = {n: t.untyped_storage().data_ptr() for n, t in fast.state_dict.items()}
    assert _partition(plain_groups) == _partition(fast_groups)


def _partition(ptrs: dict[str, int]) -> set[frozenset[str]]:
    groups: dict[int, set[str]] = {}
    for name, ptr in ptrs.items():
        groups.setdefault(ptr, set()).add(name)
    return {frozenset(g) for g in groups.values()}


def test_fast_load_outputs_are_bitwise_at_an_unseen_shape(tiny_wrapper, saved: Path, plain) -> None:
    fast = load_pipeline(saved).program
    inputs = example_inputs(tiny_wrapper, 3, 1, seed=23)
    assert_bitwise(plain.module()(*inputs), fast.module()(*inputs))


def test_weights_are_copy_on_write(saved: Path) -> None:
    before = sha256_file(saved)
    first = load_program(saved)
    name, tensor = next((n, t) for n, t in first.state_dict.items() if t.numel() > 0)
    original = tensor.detach().clone()
    with torch.no_grad():
        tensor.add_(1.0)
    assert sha256_file(saved) == before
    again = load_program(saved)
    assert torch.equal(again.state_dict[name], original)
    assert not torch.equal(first.state_dict[name], original)


def test_scope_restores_on_exception_and_nests(saved: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with fast_load_scope(saved):
            assert _patched_names() != ORIGINALS
            with fast_load_scope():
                pass
            assert _patched_names() != ORIGINALS, "inner scope must not restore for the outer one"
            raise RuntimeError("boom")
    assert _patched_names() == ORIGINALS
    assert not set(installed_patches()) & {p.name for p in fast_load.FAST_LOAD_PATCHES}


def test_other_threads_are_not_served_from_the_mapping(saved: Path) -> None:
    with fast_load_scope(saved) as mapped:
        assert mapped is not None
        result: dict[str, torch.export.ExportedProgram] = {}
        worker = threading.Thread(target=lambda: result.setdefault("ep", torch.export.load(saved)))
        worker.start()
        worker.join()
        assert mapped.mapped_records == 0
    assert "ep" in result


def test_fallback_when_internals_changed(saved: Path, plain, monkeypatch, caplog) -> None:
    def other_signature(reader, config):  # another torch's shape of the hook
        raise AssertionError("must not be called")

    monkeypatch.setattr(_package, "_build_file_map", other_signature)
    with pytest.raises(FastLoadUnavailable, match="_build_file_map"):
        fast_load.check_internals()
    monkeypatch.undo()
    monkeypatch.delattr(_package, "_build_file_map")
    with pytest.raises(FastLoadUnavailable, match="_build_file_map is missing"):
        load_program(saved)
    monkeypatch.undo()
    # a torch whose serializer module moved: the fast path gives up, torch.export.load works
    moved = tuple(
        dataclasses.replace(p, target=p.target.replace("serde.serialize.", "serde.serialize_moved."))
        for p in fast_load.FAST_LOAD_PATCHES
    )
    monkeypatch.setattr(fast_load, "FAST_LOAD_PATCHES", moved)
    with caplog.at_level(logging.WARNING, logger="sam3_exportable.artifact"):
        loaded = load_pipeline(saved)
    monkeypatch.undo()
    assert "fast .pt2 loading is unavailable" in caplog.text and "serialize_moved" in caplog.text
    assert _patched_names() == ORIGINALS
    assert str(loaded.program.graph_module.code) == str(plain.graph_module.code)


def test_fast_false_is_plain_torch(saved: Path, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("fast path used")

    monkeypatch.setattr(fast_load, "load_program", refuse)
    loaded = load_pipeline(saved, fast=False)
    assert loaded.program.state_dict
    with pytest.raises(AssertionError, match="fast path used"):
        load_pipeline(saved)


@pytest.mark.parametrize("hash_first", [False, True])
def test_hash_mismatch_is_still_an_artifact_error(saved: Path, tmp_path: Path, hash_first: bool) -> None:
    copy = tmp_path / "tiny.pt2"
    data = bytearray(saved.read_bytes())
    manifest = json.loads(manifest_path(saved).read_text())
    with zipfile.ZipFile(saved) as zf:  # flip one byte in the middle of a weight record
        info = max((i for i in zf.infolist() if "/data/weights/" in i.filename), key=lambda i: i.file_size)
    data[info.header_offset + info.file_size // 2] ^= 0xFF  # inside the local header + data span
    copy.write_bytes(bytes(data))
    manifest_path(copy).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        load_pipeline(copy, hash_first=hash_first)
    loaded = load_pipeline(copy, verify_hash=False)  # a flipped weight byte still loads
    assert loaded.program.state_dict


def test_decoder_builds_what_torch_builds(saved: Path) -> None:
    with zipfile.ZipFile(saved) as zf:
        name = next(n for n in zf.namelist() if n.endswith("models/model.json"))
        data = json.loads(zf.read(name))
    want = serialize._dict_to_dataclass(schema.ExportedProgram, data)
    decoder = _SchemaDecoder(serialize, serialize._dict_to_dataclass)
    got = decoder(schema.ExportedProgram, data)
    assert decoder.fallbacks == 0
    assert got == want
    assert serialize._dataclass_to_dict(got) == serialize._dataclass_to_dict(want)

    calls = []

    def real(cls, value):
        calls.append(cls)
        return "torch's answer"

    surprised = _SchemaDecoder(serialize, real)
    surprised._plan = lambda cls: (_ for _ in ()).throw(KeyError("new schema construct"))
    assert surprised(schema.ExportedProgram, data) == "torch's answer"
    assert calls == [schema.ExportedProgram] and surprised.fallbacks == 1


def test_sympify_memo_is_keyed_by_the_bindings_it_uses() -> None:
    memo = _Memo()
    sympify = _memo_sympify(sympy.sympify, sympy, memo)
    a, b = sympy.Symbol("s0", positive=True), sympy.Symbol("s0", integer=True)
    first = sympify("s0*2 + 1", locals={"s0": a, "unused": b})
    assert first.free_symbols == {a}
    assert sympify("s0*2 + 1", locals={"s0": a, "unused": a}) is first  # unused names don't matter
    other = sympify("s0*2 + 1", locals={"s0": b})
    assert other.free_symbols == {b} and other != first
    unbound = sympify("s0*2 + 1", locals={})
    assert unbound == sympy.sympify("s0*2 + 1")
    assert sympify(sympy.Integer(3)) == 3  # non-strings pass through
    assert (memo.hits, memo.misses) == (1, 3)


def test_type_hints_memo_returns_private_copies() -> None:
    memo = _Memo()
    import typing

    hints = _memo_get_type_hints(typing.get_type_hints, memo)
    ns = vars(schema)
    first = hints(schema.TensorMeta, globalns=ns)
    assert first == typing.get_type_hints(schema.TensorMeta, globalns=ns)
    first.clear()
    assert hints(schema.TensorMeta, globalns=ns) == typing.get_type_hints(schema.TensorMeta, globalns=ns)
    assert len(memo.type_hints) == 1


def test_load_program_pauses_the_garbage_collector_and_restores_it(
    tiny_ep: torch.export.ExportedProgram, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gc

    from sam3_exportable import fast_load

    path = tmp_path / "gc.pt2"
    torch.export.save(tiny_ep, path)
    seen: list[bool] = []
    real_load = torch.export.load

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(gc.isenabled())
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch.export, "load", spy)
    assert gc.isenabled()
    fast_load.load_program(path)
    assert seen == [False] and gc.isenabled()

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("boom")

    monkeypatch.setattr(torch.export, "load", broken)
    with pytest.raises(RuntimeError, match="boom"):
        fast_load.load_program(path)
    assert gc.isenabled()
    gc.disable()
    try:
        with fast_load.gc_paused():
            pass
        assert not gc.isenabled(), "a collector disabled by the caller was switched on"
    finally:
        gc.enable()
