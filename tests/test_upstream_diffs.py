"""patches/: the same fixes as upstream-ready diffs, proven equivalent to the runtime layer."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import sam3
import torch
from conftest import assert_bitwise, example_inputs
from unit_probe import probe

from sam3_exportable.patching.selection import exportable_sam3, patch_by_name
from sam3_exportable.patching.upstream import ALL_PATCHES

ROOT = Path(__file__).resolve().parents[1]
DIFFS = sorted((ROOT / "patches").glob("*.patch"))
UPSTREAM = Path(sam3.__file__).resolve().parent
FINGERPRINT = re.compile(r"^\s*Fingerprint: (\S+) ([0-9a-f]{16})$", re.M)
OPT_IN = {"model_misc.sdpa_box_rpb_cross_attention"}  # not proposed upstream (not needed)


def _copy_upstream(tmp: Path) -> Path:
    shutil.copytree(UPSTREAM, tmp / "sam3", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp


def _apply(diff: Path, root: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["patch", "-p1", "--batch", "--forward", *extra, "-d", str(root), "-i", str(diff)],
        capture_output=True,
        text=True,
    )


def test_every_default_patch_has_a_diff_and_each_diff_applies(tmp_path: Path) -> None:
    root = _copy_upstream(tmp_path)
    mirrored = [name for diff in DIFFS for name, _ in FINGERPRINT.findall(diff.read_text())]
    assert sorted(mirrored) == sorted(p.name for p in ALL_PATCHES if p.name not in OPT_IN)
    for diff in DIFFS:
        result = _apply(diff, root, "--dry-run")
        assert result.returncode == 0, f"{diff.name}: {result.stdout}{result.stderr}"


def _function_source(path: Path, dotted: str) -> str:
    """Source of ``Class.method`` or ``function`` in a file, as inspect.getsource + dedent gives it."""
    lines = path.read_text().splitlines(keepends=True)
    *cls_name, func_name = dotted.split(".")
    tree = ast.parse("".join(lines))
    scopes = [n.body for n in tree.body if isinstance(n, ast.ClassDef) and [n.name] == cls_name]
    for body in scopes if cls_name else [tree.body]:
        for item in body:
            if isinstance(item, ast.FunctionDef) and item.name == func_name:
                start = min([d.lineno for d in item.decorator_list] + [item.lineno]) - 1
                return textwrap.dedent("".join(lines[start : item.end_lineno]))
    raise LookupError(f"{dotted} not in {path}")


def test_diff_headers_and_runtime_fingerprints_agree(tmp_path: Path) -> None:
    import hashlib

    root = _copy_upstream(tmp_path)
    for diff in DIFFS:
        text = diff.read_text()
        for name, recorded in FINGERPRINT.findall(text):
            patch = patch_by_name(name)
            assert recorded == patch.fingerprint, f"{diff.name}: header of {name} != runtime patch"
            _, _, dotted = patch.target.partition(".model.")
            file = root / "sam3" / "model" / f"{dotted.split('.')[0]}.py"
            assert f"+++ b/sam3/model/{file.name}" in text, f"{diff.name} does not touch {file.name}"
            source = _function_source(file, ".".join(dotted.split(".")[1:]))
            found = hashlib.sha256(source.encode()).hexdigest()[:16]
            assert found == recorded, f"{name}: the source the diff applies to has fingerprint {found}"


CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])  # the patched upstream copy comes first
    sys.path.insert(1, "tests")
    import torch
    import sam3
    assert sam3.__file__.startswith(sys.argv[1]), sam3.__file__
    import sam3_exportable.patching as patching
    from sam3_exportable import FullSam3PipelineWrapper, build_model
    from sam3_exportable.export import audit_dynamic_shapes, example_inputs
    torch.set_num_threads(2)
    calls = []
    patching.PatchSession.apply = lambda self: calls.append(self)  # any use would show
    model = build_model("tiny", seed=0, runtime_patches=False)
    wrapper = FullSam3PipelineWrapper(model).eval()
    dims = ({0: torch.export.Dim("batch", min=1)}, {0: torch.export.Dim("num_prompts", min=1)})
    ep = torch.export.export(wrapper, example_inputs(wrapper, 2, 2), dynamic_shapes=dims)
    audit_dynamic_shapes(ep)
    from unit_probe import probe
    outs = {"probe": probe(model)}
    for b, p in ((1, 3), (3, 2)):
        outs[(b, p)] = tuple(ep.module()(*example_inputs(wrapper, b, p, seed=13)))
    assert not calls, "runtime patches were applied"
    torch.save(outs, sys.argv[2])
    print("patched-upstream export ok")
    """
)


def _export_with_diffs(tmp_path: Path, *, crash_is_caught: bool = False) -> dict | None:
    """The child's outputs; None when it crashed and ``crash_is_caught`` (a kernel that
    refuses the broken inputs: torchvision 0.29.2's roi_align checks batch indices)."""
    root = _copy_upstream(tmp_path / "upstream")
    for diff in DIFFS:
        result = _apply(diff, root)
        assert result.returncode == 0, result.stdout + result.stderr
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(root), str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    if crash_is_caught and run.returncode != 0 and "roi_align" in run.stderr:
        return None
    assert run.returncode == 0, run.stderr[-4000:]
    return torch.load(tmp_path / "out.pt")


def _mismatches(tiny_model, tiny_wrapper, tiny_ep, outs: dict) -> list[str]:
    with exportable_sam3():
        expected = probe(tiny_model)
    bad = [k for k, v in outs.pop("probe").items() if not torch.equal(v, expected[k])]
    for (b, p), got in outs.items():
        ref = tiny_ep.module()(*example_inputs(tiny_wrapper, b, p, seed=13))
        bad += [f"pipeline{(b, p)}"] * (not all(torch.equal(x, y) for x, y in zip(ref, got, strict=True)))
    return bad


def test_diffs_export_bitwise_like_runtime_patches(tiny_model, tiny_wrapper, tiny_ep, tmp_path: Path) -> None:
    outs = _export_with_diffs(tmp_path)
    assert outs is not None
    assert set(outs) == {"probe", (1, 3), (3, 2)}
    for (b, p), got in ((k, v) for k, v in outs.items() if k != "probe"):
        assert_bitwise(tiny_ep.module()(*example_inputs(tiny_wrapper, b, p, seed=13)), got)
    assert _mismatches(tiny_model, tiny_wrapper, tiny_ep, outs) == []


def test_a_broken_diff_is_caught(tiny_model, tiny_wrapper, tiny_ep, tmp_path: Path, monkeypatch) -> None:
    # Break the batched-rois diff the way a careless edit would: batch index last.
    original = next(d for d in DIFFS if "geometry" in d.name)
    text = original.read_text()
    broken = text.replace(
        "torch.cat([batch_index, per_image], dim=2)", "torch.cat([per_image, batch_index], dim=2)"
    )
    assert broken != text
    bad = tmp_path / original.name
    bad.write_text(broken)
    monkeypatch.setattr(sys.modules[__name__], "DIFFS", [bad if d == original else d for d in DIFFS])
    outs = _export_with_diffs(tmp_path, crash_is_caught=True)
    assert outs is None or "encode_boxes" in _mismatches(tiny_model, tiny_wrapper, tiny_ep, outs)


DOCTOR = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    from sam3_exportable.cli import main
    sys.exit(main(["doctor"]))
    """
)


def test_doctor_reports_fixes_in_a_patched_upstream(tmp_path: Path) -> None:
    root = _copy_upstream(tmp_path)
    for diff in DIFFS:
        assert _apply(diff, root).returncode == 0
    run = subprocess.run(
        [sys.executable, "-c", DOCTOR, str(root)], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert run.returncode == 1, run.stderr[-3000:]  # fingerprints no longer match
    rows = {
        line.split()[0]: line
        for line in run.stdout.splitlines()
        if line.startswith(("position", "decoder", "encoder", "geometry", "model_misc"))
        and line.split()[0] not in OPT_IN
    }
    assert len(rows) == len(ALL_PATCHES) - len(OPT_IN)
    assert all("fixed upstream" in line for line in rows.values()), rows
    # _get_coords itself is unchanged (the fix is in __init__); every other target changed
    assert "MISMATCH" not in rows["decoder.coords_on_available_device"]
    assert sum("MISMATCH" in line for line in rows.values()) == len(rows) - 1
    assert "no longer match upstream" in run.stdout
