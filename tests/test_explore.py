"""The edit explorer, driven headless through its callbacks: pick, edit, see what changed, undo
(bit-exact), save; a bad fact is an error in the status line and the model stays unedited."""

from __future__ import annotations

import pytest
import torch

from pmetlab import Deltas
from pmetlab.explore import STATUS_APPLIED, EditSession, Explorer, Fact
from tests.test_experiments import counterfact_records, tiny_env, tiny_hparams, tiny_mt, zsre_records  # noqa: F401

pytest.importorskip("ipywidgets")


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model, before) -> bool:
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.fixture
def explorer(tiny_env, tiny_mt):  # noqa: F811
    fixed = {k: v for k, v in tiny_hparams(tiny_env).items() if k != "layers"}
    session = EditSession(*tiny_mt, "tiny", n_gen_tokens=3, fixed=fixed)
    ex = Explorer(session, {"counterfact": counterfact_records(), "zsre": zsre_records()})
    ex.layers.value = "0-1"
    return ex


def test_pick_run_undo_save_through_the_callbacks(explorer, tiny_mt, tmp_path):  # noqa: F811
    model, _ = tiny_mt
    before = _state(model)
    explorer.index.value = 1
    explorer.on_pick()
    assert explorer.subject.value == "paris" and explorer.target_new.value == "germany"
    out = explorer.on_run()
    assert out is not None and STATUS_APPLIED in explorer.status.value, explorer.status.value
    assert not _same(model, before) and explorer.session.edited
    after = out.targets[out.targets["state"] == "after"].set_index("probe")["p_new"]
    prior = out.targets[out.targets["state"] == "before"].set_index("probe")["p_new"]
    assert after["rewrite"] > prior["rewrite"], "the edit raises p(new object) on the rewrite prompt"
    assert set(out.topk["probe"]) == {"rewrite", "paraphrase", "neighborhood"}
    assert list(out.norms["layer"]) == [0, 1] and set(out.generations) == {"before", "after"}
    assert "top next tokens" in explorer.result.value
    explorer.save_path.value = str(tmp_path / "e.safetensors")
    explorer.on_save()
    assert "saved to" in explorer.status.value and Deltas.load(tmp_path / "e.safetensors").tensors
    explorer.on_undo()
    assert _same(model, before) and "undone" in explorer.status.value
    explorer.on_undo()
    assert explorer.status.value == "nothing to undo"


def test_knobs_reach_the_hyperparameters_and_a_second_edit_replaces_the_first(explorer, tiny_mt):  # noqa: F811
    model, _ = tiny_mt
    before = _state(model)
    explorer.method.value, explorer.lam.value, explorer.spread.value = "memit", 5.0, 1.0
    hp = explorer.session.hparams(explorer.method.value, explorer.knobs())
    assert (hp.method, hp.mom2_update_weight, hp.spread_exponent, hp.layers) == ("memit", 5.0, 1.0, (0, 1))
    first = explorer.on_run()
    explorer.method.value, explorer.no_attn.value = "pmet", True
    assert explorer.session.hparams("pmet", explorer.knobs()).optimize_attn is False
    second = explorer.on_run()
    assert first is not None and second is not None
    explorer.on_undo()
    assert _same(model, before), "the second edit was computed on the unedited model and undoes to it"


def test_a_bad_fact_is_an_error_in_the_status_and_leaves_the_model_unedited(explorer, tiny_mt):  # noqa: F811
    model, _ = tiny_mt
    before = _state(model)
    explorer.prompt.value = "no placeholder here"
    assert explorer.on_run() is None
    assert explorer.status.value.startswith("<b>error:</b>") and _same(model, before)
    explorer.on_save()
    assert "no edit to save yet" in explorer.status.value


def test_typed_and_zsre_facts_probe_their_prompts():
    f = Fact.typed("the queen", "{} speaks", "french", paraphrase="she speaks")
    assert f.probes() == {"rewrite": "the queen speaks", "paraphrase": "she speaks"}
    z = Fact.from_record(zsre_records()[0])
    assert z.request.target_new == "france" and z.paraphrase and z.neighborhood


def test_undo_refuses_weights_its_edit_did_not_leave(explorer, tiny_mt, tmp_path):  # noqa: F811
    from pmetlab.editing.deltas import EditMismatchError

    model, tok = tiny_mt
    before = _state(model)
    a, b = explorer.session, EditSession(model, tok, "tiny", n_gen_tokens=3, fixed=explorer.session.fixed)
    hp = a.hparams("pmet", {"layers": [0, 1]})
    fact = Fact.from_record(counterfact_records()[0])
    a.edit(fact, hp, progress=False)
    after_a = _state(model)
    b.edit(Fact.from_record(counterfact_records()[1]), hp, progress=False)  # on top of A's edit
    with pytest.raises(EditMismatchError, match="no longer the ones it left"):
        a.undo()
    assert a.edited and not _same(model, after_a)  # nothing restored: B's edit is still there
    explorer.on_undo()
    assert "no longer the ones it left" in explorer.status.value
    assert b.undo() and _same(model, after_a)  # the latest first, then A's
    assert a.undo() and _same(model, before) and not a.edited


def test_save_after_a_failed_edit_refuses_the_stale_update(explorer, tiny_mt, tmp_path, monkeypatch):  # noqa: F811
    from pmetlab.explore import session as session_mod

    model, _ = tiny_mt
    before = _state(model)
    s = explorer.session
    hp = s.hparams("pmet", {"layers": [0, 1]})
    s.edit(Fact.from_record(counterfact_records()[0]), hp, progress=False)
    assert s.save(tmp_path / "first.safetensors").is_file()

    def boom(*a, **k):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(session_mod, "compute_deltas", boom)
    with pytest.raises(RuntimeError, match="injected"):
        s.edit(Fact.from_record(counterfact_records()[1]), hp, progress=False)
    assert _same(model, before) and not s.edited and s.outcome is None
    with pytest.raises(ValueError, match=r"the last edit failed \(RuntimeError: injected failure\)"):
        s.save(tmp_path / "second.safetensors")
    assert not (tmp_path / "second.safetensors").exists()
