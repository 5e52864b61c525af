"""heartseg-export writes pipeline files (one graph from scan to mask), checks the graph against the reference
pipeline, upgrades files of older exports (--upgrade), and a pipeline file reads back into trainable networks.

Reuses the tiny cascade trained once per session by `trained_run` (tests/conftest.py).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="the training side needs PyTorch: pip install -e '.[train]'")
import onnx  # noqa: E402
import torch  # noqa: E402
from conftest import unwrapped  # noqa: E402
from heartseg.export.cli import app  # noqa: E402
from heartseg.runtime.contract import CONTRACT_KEY, FORMAT_VERSION, PIPELINE_INPUTS, PIPELINE_OUTPUTS  # noqa: E402
from heartseg.runtime.formats.nifti import load_volume  # noqa: E402
from heartseg.runtime.inference import infer_canonical  # noqa: E402
from heartseg.runtime.postprocess import mask_from_prob  # noqa: E402
from heartseg.runtime.metrics import dice_score  # noqa: E402
from heartseg.runtime.model_digest import DIGEST_KEY  # noqa: E402
from heartseg.runtime.preprocess import to_canonical  # noqa: E402
from heartseg.runtime.session import OnnxSession, read_contract  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

SCAN = "syn_001.nii.gz"


def _cli(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def _assert_refused(result, needles: list[str]) -> None:
    text = unwrapped(result.output)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output and text.startswith("error:"), text
    for needle in needles:
        assert needle in text, (needle, text)


def _meta(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def _scan(trained_run, name: str = SCAN) -> Path:
    return trained_run.data / "imagesTr" / name


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> Path:
    """trained_run's model.pt exported with the parity checks on one scan."""
    out = tmp_path_factory.mktemp("pipeline") / "P.onnx"
    result = _cli(trained_run.model, "-o", out, "--threads", "1", "--scan", _scan(trained_run))
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return out


@pytest.fixture(scope="module")
def old_file(trained_run, tmp_path_factory) -> Path:
    """The stages' networks side by side, as heartseg-export wrote them before pipeline files, with a contract of
    format 2 (no stage roles, no crop context): what --upgrade takes."""
    from heartseg.export.model_file import load_trained_model
    from heartseg.export.onnx_export import export_onnx
    from heartseg.export.stamp import save_stamped, set_metadata

    path = export_onnx(load_trained_model(trained_run.model), tmp_path_factory.mktemp("old") / "old.onnx")
    proto = onnx.load(str(path))
    contract = json.loads(_meta(path)[CONTRACT_KEY])
    contract["format_version"] = 2
    contract.pop("pipeline", None)
    for stage in contract["stages"]:
        stage.pop("role")
        stage.pop("context", None)
    set_metadata(proto, CONTRACT_KEY, json.dumps(contract))
    set_metadata(proto, "heartseg.format_version", "2")
    return save_stamped(proto, path)


# ----------------------------------------------------------------------------------------------------------
# The export writes a pipeline file


def test_export_writes_a_pipeline_file(exported):
    contract, meta = read_contract(exported)
    assert contract.pipeline is True and contract.format_version == FORMAT_VERSION == 8
    assert meta["heartseg.format_version"] == "8"
    proto = onnx.load(str(exported))
    # The inputs a caller must feed (an optional one has its default among the initialisers).
    defaults = {t.name for t in proto.graph.initializer}
    assert [i.name for i in proto.graph.input if i.name not in defaults] == list(PIPELINE_INPUTS)
    assert [o.name for o in proto.graph.output] == list(PIPELINE_OUTPUTS)
    onnx.checker.check_model(str(exported), full_check=True)
    from test_contract import expected_digest

    assert meta[DIGEST_KEY] == expected_digest(proto)


def test_the_exported_graph_segments_a_scan(exported, trained_run):
    session = OnnxSession(exported, device="cpu", threads=1)
    canonical = to_canonical(load_volume(_scan(trained_run, "syn_000.nii.gz")), session.contract.orientation)
    label = to_canonical(load_volume(trained_run.data / "labelsTr" / "syn_000.nii.gz"), "RAS").data > 0
    out = session.segment(canonical.data, canonical.spacing)
    assert out.mask.shape == canonical.data.shape and out.mask.dtype == np.uint8
    assert dice_score(out.mask > 0, label) > 0.8


def test_the_parity_report_records_the_graphs_dice_on_each_scan(exported, trained_run):
    from heartseg.export.graph_parity import MIN_GRAPH_DICE
    from heartseg.export.pipeline_file import networks_file

    report = json.loads(exported.with_name("P.parity.json").read_text())
    (graph,) = [r for r in report if r["what"] == f"{SCAN}: pipeline graph"]
    assert graph["ok"] is True and graph["min_dice"] == MIN_GRAPH_DICE == 0.995
    assert graph["dice"] >= MIN_GRAPH_DICE
    # The recorded Dice is that of the graph's mask against the reference pipeline's with the file's own networks.
    with networks_file(exported) as networks:
        reference = OnnxSession(networks, device="cpu", threads=1)
        canonical = to_canonical(load_volume(_scan(trained_run)), reference.contract.orientation)
        expected = mask_from_prob(infer_canonical(canonical, reference.contract, reference.predict).prob,
                                  reference.contract)
    got = OnnxSession(exported, device="cpu", threads=1).segment(canonical.data, canonical.spacing).mask
    assert np.count_nonzero(expected) > 0
    assert graph["dice"] == pytest.approx(dice_score(got > 0, expected > 0), abs=1e-12)


def _shifted_head(networks: Path, shift: float) -> onnx.ModelProto:
    """The networks model with the fine stage's output bias moved by shift (its mask grows or shrinks)."""
    from onnx import numpy_helper

    proto = onnx.load(str(networks))
    (bias,) = [t for t in proto.graph.initializer if t.name == "heads.1.network.head.bias"]
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.float32(shift), bias.name))
    return proto


def test_graph_parity_refuses_a_graph_that_computes_something_else(exported, trained_run, tmp_path):
    from heartseg.export.graph_parity import ParityError, check_graph_parity
    from heartseg.export.pipeline_file import networks_file, write_pipeline

    with networks_file(exported) as networks:
        assert all(r.ok for r in check_graph_parity(networks, exported, [_scan(trained_run)], threads=1))
        other = write_pipeline(_shifted_head(networks, 5.0), tmp_path / "other.onnx")
        with pytest.raises(ParityError, match=f"{SCAN}: pipeline graph: Dice"):
            check_graph_parity(networks, other, [_scan(trained_run)], threads=1)


def test_an_export_whose_graph_disagrees_is_not_written(trained_run, tmp_path, monkeypatch):
    from heartseg.export import pipeline_file

    real = pipeline_file.wrap

    def wrong(networks, source="model"):
        # The graph around networks whose fine stage says foreground more readily than the ones checked.
        from onnx import numpy_helper

        copy = onnx.ModelProto()
        copy.CopyFrom(networks)
        (bias,) = [t for t in copy.graph.initializer if t.name == "heads.1.network.head.bias"]
        bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.float32(5.0), bias.name))
        return real(copy, source)

    monkeypatch.setattr(pipeline_file, "wrap", wrong)
    out = tmp_path / "W.onnx"
    result = _cli(trained_run.model, "-o", out, "--threads", "1", "--scan", _scan(trained_run))
    assert result.exit_code == 1, result.output
    assert "pipeline graph" in unwrapped(result.output) and "Traceback" not in result.output
    assert not out.exists() and not out.with_name("W.parity.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".onnx"], "a temporary file was left behind"


# ----------------------------------------------------------------------------------------------------------
# --upgrade


def test_upgrade_wraps_an_older_networks_file(old_file, trained_run, tmp_path):
    from heartseg.export.pipeline_file import networks_file

    before = old_file.read_bytes()
    new = tmp_path / "new.onnx"
    result = _cli("--upgrade", old_file, new, "--threads", "1", "--scan", _scan(trained_run))
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    assert old_file.read_bytes() == before
    assert "pipeline graph" in unwrapped(result.output)
    onnx.checker.check_model(str(new), full_check=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its digest is recorded and verified
        old_contract, old_meta = read_contract(old_file)
        contract, meta = read_contract(new)
    assert old_contract.format_version == 2 and not old_contract.pipeline
    assert contract == replace(old_contract, pipeline=True, format_version=FORMAT_VERSION)
    changed = {CONTRACT_KEY, "heartseg.format_version", DIGEST_KEY}
    assert {k: v for k, v in meta.items() if k not in changed} == \
        {k: v for k, v in old_meta.items() if k not in changed}
    assert meta["heartseg.format_version"] == "8" and meta[DIGEST_KEY] != old_meta[DIGEST_KEY]
    # Every weight of the networks is carried over byte for byte.
    old_weights = {t.name: t.SerializeToString() for t in onnx.load(str(old_file)).graph.initializer}
    new_weights = {t.name: t.SerializeToString() for t in onnx.load(str(new)).graph.initializer}
    assert {name: new_weights.get(name) for name in old_weights} == old_weights
    # The networks inside compute what the old file's do.
    x = np.random.default_rng(0).standard_normal((1, 1, 16, 16, 16)).astype(np.float32)
    old_session = OnnxSession(old_file, device="cpu", threads=1)
    with networks_file(new) as networks:
        inside = OnnxSession(networks, device="cpu", threads=1)
        for stage in contract.stages:
            np.testing.assert_array_equal(inside.predict(stage.name, x), old_session.predict(stage.name, x))
    canonical = to_canonical(load_volume(_scan(trained_run)), contract.orientation)
    assert OnnxSession(new, device="cpu", threads=1).segment(canonical.data, canonical.spacing).mask.any()


def test_upgrade_refuses_a_pipeline_file(exported, tmp_path):
    before = exported.read_bytes()
    result = _cli("--upgrade", exported, tmp_path / "again.onnx")
    _assert_refused(result, ["already a pipeline file"])
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "again.onnx").exists() and exported.read_bytes() == before


def test_upgrade_never_writes_over_the_old_file_nor_an_existing_one(old_file, tmp_path):
    before = old_file.read_bytes()
    _assert_refused(_cli("--upgrade", old_file, old_file), ["would overwrite the input"])
    assert old_file.read_bytes() == before
    new = tmp_path / "new.onnx"
    new.write_bytes(b"keep me")
    _assert_refused(_cli("--upgrade", old_file, new), ["exists", "--overwrite"])
    assert new.read_bytes() == b"keep me"
    result = _cli("--upgrade", old_file, new, "--overwrite")
    assert result.exit_code == 0, result.output
    assert read_contract(new)[0].pipeline and old_file.read_bytes() == before


def test_upgrade_refuses_a_damaged_file_and_incomplete_commands(old_file, tmp_path):
    from onnx import numpy_helper

    proto = onnx.load(str(old_file))
    (head,) = [t for t in proto.graph.initializer if t.name == "heads.1.network.head.bias"]
    head.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(head), head.name))
    altered = tmp_path / "altered.onnx"
    onnx.save(proto, str(altered))
    _assert_refused(_cli("--upgrade", altered, tmp_path / "a.onnx"), ["altered or damaged"])
    _assert_refused(_cli("--upgrade", old_file), ["OLD.onnx NEW.onnx"])
    _assert_refused(_cli("--upgrade", old_file, tmp_path / "b.onnx", "--fp16"), ["--fp16"])
    _assert_refused(_cli(old_file, tmp_path / "c.onnx"), ["--upgrade"])
    assert not [p for p in tmp_path.iterdir() if p.name != "altered.onnx"]


def test_upgrade_of_a_file_without_a_digest_warns_once_and_records_one(old_file, trained_run, tmp_path):
    from heartseg.runtime.model_digest import UnverifiedModelWarning

    proto = onnx.load(str(old_file))
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key != DIGEST_KEY]
    del proto.metadata_props[:]
    for key, value in kept:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    undigested = tmp_path / "undigested.onnx"
    onnx.save(proto, str(undigested))
    with pytest.warns(UnverifiedModelWarning):
        read_contract(undigested)
    new = tmp_path / "new.onnx"
    result = _cli("--upgrade", undigested, new, "--scan", _scan(trained_run), "--threads", "1")
    assert result.exit_code == 0, result.output
    assert unwrapped(result.output).count("warning:") == 1 and "no weights digest" in unwrapped(result.output)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_contract(new)[0].pipeline


def test_upgrade_needs_no_torch(old_file, tmp_path):
    import os
    import subprocess
    import sys

    new = tmp_path / "new.onnx"
    code = ("import sys\n"
            "sys.modules['torch'] = None  # any 'import torch' now raises ImportError\n"
            "from heartseg.export.cli import main\n"
            f"sys.argv = ['heartseg-export', '--upgrade', {str(old_file)!r}, {str(new)!r}]\n"
            "try:\n"
            "    main()\n"
            "finally:\n"
            "    assert sys.modules.get('torch') is None, 'torch was imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert read_contract(new)[0].pipeline


def test_help_explains_upgrade():
    result = CliRunner().invoke(app, ["--help"])
    text = unwrapped(result.output)
    assert result.exit_code == 0
    assert "--upgrade OLD.onnx NEW.onnx" in text and "pipeline file" in text and "never replaced" in text, text


# ----------------------------------------------------------------------------------------------------------
# A pipeline file reads back into trainable networks


def test_a_pipeline_file_reads_back_as_the_networks_it_wraps(exported, trained_run):
    from heartseg.train.model_files import read_model

    assert read_contract(exported)[0].pipeline
    original = read_model(trained_run.model)
    imported = read_model(exported)
    # What reads back is the networks: a model.pt made from them exports anew (the contract is no pipeline's).
    assert imported.kind == "exported" and not imported.contract.pipeline
    assert imported.contract == replace(read_contract(exported)[0], pipeline=False)
    for stage in original.contract.stages:
        (ours,), (theirs,) = imported.networks[stage.name], original.networks[stage.name]
        assert ours.unet == theirs.unet and ours.state_dict.keys() == theirs.state_dict.keys()
    # Instance-normalised convolutions come back exactly; the localiser's folded BatchNorm computes the same.
    (fine,), (ours,) = original.networks["fine"], imported.networks["fine"]
    for key, value in fine.state_dict.items():
        assert torch.equal(value, ours.state_dict[key]), key
