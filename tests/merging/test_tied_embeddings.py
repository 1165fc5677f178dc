"""The tied-embedding rule (merging.plan.inputs): a tied model without `lm_head` merges with one that has it, its
embedding standing in for its lm_head; and mixed architectures are refused unless allowed."""

from __future__ import annotations

import json

import pytest
import torch

from evaluations.cli import main
from merging import merge
from taxonomy.errors import BasinError
from tests.merging.test_vocab_llama import EMBED, HEAD, WORDS_A, save_model, tensors


def _linear(*folders, **extra) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(f), "parameters": {"weight": w}}
                                                 for f, w in zip(folders, (0.25, 0.75))], **extra}


@pytest.fixture(scope="module")
def tied_untied(tmp_path_factory):
    root = tmp_path_factory.mktemp("tied")
    tied = save_model(root / "tied", WORDS_A, 0, tied=True)
    untied = save_model(root / "untied", WORDS_A, 1)
    return tied, untied


def test_tied_model_merges_with_untied(tmp_path, tied_untied):
    from transformers import AutoModelForCausalLM

    tied, untied = tied_untied
    assert HEAD not in tensors(tied) and HEAD in tensors(untied)
    for order in ((tied, untied), (untied, tied)):
        out = tmp_path / f"out-{order[0].name}"
        merge(_linear(*order), out, progress=False)
        st, su, so = tensors(tied), tensors(untied), tensors(out)
        w_tied, w_untied = (0.25, 0.75) if order[0] == tied else (0.75, 0.25)
        torch.testing.assert_close(so[HEAD], w_tied * st[EMBED] + w_untied * su[HEAD])
        torch.testing.assert_close(so[EMBED], w_tied * st[EMBED] + w_untied * su[EMBED])
        config = json.loads((out / "config.json").read_text())
        assert config["tie_word_embeddings"] is False
        model = AutoModelForCausalLM.from_pretrained(out)
        torch.testing.assert_close(model.lm_head.weight.detach(), so[HEAD])
        assert not torch.equal(model.lm_head.weight, model.get_input_embeddings().weight)


def test_all_tied_stays_tied(tmp_path, tied_untied):
    from transformers import AutoModelForCausalLM

    tied, _ = tied_untied
    other = save_model(tmp_path / "tied2", WORDS_A, 2, tied=True)
    merge(_linear(tied, other), tmp_path / "out", progress=False)
    assert HEAD not in tensors(tmp_path / "out")
    assert json.loads((tmp_path / "out/config.json").read_text())["tie_word_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_missing_lm_head_without_tie_is_an_error(tmp_path, tied_untied):
    from safetensors.torch import load_file, save_file

    tied, untied = tied_untied
    headless = tmp_path / "headless"
    headless.mkdir()
    state = load_file(untied / "model.safetensors")
    state.pop(HEAD)
    save_file(state, headless / "model.safetensors", metadata={"format": "pt"})
    (headless / "config.json").write_text((untied / "config.json").read_text())  # tie_word_embeddings: false
    with pytest.raises(BasinError, match="lm_head.weight.*does not say tie_word_embeddings: true"):
        merge(_linear(untied, headless), None, dry_run=True, progress=False)


def test_mixed_architectures_refused_unless_allowed(tmp_path, capsys):
    llama = save_model(tmp_path / "llama", None, 0, vocab=20)
    mistral = save_model(tmp_path / "mistral", None, 1, vocab=20, model_type="mistral")
    with pytest.raises(BasinError, match=r"mix architectures.*LlamaForCausalLM \(llama\).*MistralForCausalLM "
                                         r"\(mistral\).*--allow-mixed-architectures"):
        merge(_linear(llama, mistral), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    merge(_linear(llama, mistral), tmp_path / "out", progress=False, allow_mixed_architectures=True)
    merge(_linear(llama, mistral, allow_mixed_architectures=True), tmp_path / "out2", progress=False)
    sl, sm, so = tensors(llama), tensors(mistral), tensors(tmp_path / "out2")
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(so[name], 0.25 * sl[name] + 0.75 * sm[name])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(_linear(llama, mistral)))
    assert main(["merge", str(recipe), "--dry-run", "--no-progress"]) == 2
    assert "--allow-mixed-architectures" in capsys.readouterr().err
    assert main(["merge", str(recipe), "--dry-run", "--no-progress", "--allow-mixed-architectures"]) == 0
