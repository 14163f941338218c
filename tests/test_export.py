"""Export: a real tiny run -> an HF folder that transformers loads with the JAX student's logits,
a card with the run's figures, and the hub push against a local HTTP stand-in for the hub."""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from distil_jax import checkpoint, export as export_lib, hf
from tests import tiny_setup as T
from distil_jax.export import PushError, export, main, push_to_hub
from distil_jax import models

F32_TOL = 1e-5  # max abs logit difference, float32 export vs the JAX student
# bfloat16 export: the weights are the float32 ones rounded to nearest bfloat16 (checked exactly);
# loaded in float32, its logits equal the JAX student's with those rounded weights to F32_TOL.
# Against the float32 student, loaded in float32 or run in bfloat16 (dtype="auto"), the logits
# differ by at most BF16_REL_TOL x the largest |logit| (measured on the tiny run: 0.07% with
# float32 compute, 0.3% with bfloat16 compute).
BF16_REL_TOL = 2e-2
TOKEN = "hf_TESTtoken_0123456789abcdef"
TEXT = ["Return the number of items in a container.", "def f(x):\n    return x + 1"]


def _tiny_config():
    c = T.tiny_run_config()
    c.demo_teacher.vocab_size = 500  # not a multiple of 128: the models store 512 rows
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real (seconds-long) distillation run: demo teacher, 30 steps, checkpoints at 20 and 30."""
    from distil_jax import train

    workdir = tmp_path_factory.mktemp("run")
    train.train(_tiny_config(), workdir)
    assert checkpoint.available_steps(workdir) == [20, 30]
    return workdir


@pytest.fixture(scope="module")
def f32_export(run, tmp_path_factory):
    return export(run, tmp_path_factory.mktemp("exports") / "f32")


def _ids(folder):
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    enc = tok(TEXT, padding=True, return_tensors="np")
    return enc["input_ids"], enc["attention_mask"]


def _jax_logits(run, ids, mask, step=None, dtype=None):
    config = hf.load_config(run / "student")
    _, tree = checkpoint.restore_params(run, step)
    params = tree["student"]
    if dtype is not None:  # round as the export does, then compute in float32
        params = jax.tree_util.tree_map(lambda x: jnp.asarray(x).astype(dtype).astype(jnp.float32), params)
    out = models.forward(config, params, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    return np.asarray(out.logits)


def _torch_logits(folder, ids, mask, dtype=torch.float32):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, dtype=dtype)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(model).__name__ == "GPT2LMHeadModel"
    with torch.no_grad():
        logits = model.eval()(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits
    return logits.float().numpy(), model


# ----------------------------------------------------------------------------- the folder


@pytest.mark.slow
def test_float32_export_loads_in_transformers_with_equal_logits(run, f32_export):
    names = {p.name for p in f32_export.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md",
            "tokenizer.json", "tokenizer_config.json"} <= names, names
    assert not [p for p in f32_export.parent.iterdir() if p.name.startswith(".")]  # no temp left
    assert json.loads((f32_export / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    # The teacher's tokenizer, unchanged.
    ours = transformers.AutoTokenizer.from_pretrained(f32_export)
    theirs = transformers.AutoTokenizer.from_pretrained(run / "tokenizer")
    assert ours(TEXT)["input_ids"] == theirs(TEXT)["input_ids"]
    ids, mask = _ids(f32_export)
    assert mask.min() == 0  # the second text is padded: the mask path is exercised
    got, model = _torch_logits(f32_export, ids, mask)
    assert model.transformer.wte.weight.dtype == torch.float32
    # The stored vocabulary is padded (common.VOCAB_MULTIPLE); the export has exactly its rows.
    config = hf.load_config(run / "student")
    assert config.vocab_size % 128 and config.padded_vocab_size > config.vocab_size
    assert tuple(model.transformer.wte.weight.shape) == (config.vocab_size, config.n_embd)
    assert got.shape[-1] == config.vocab_size
    want = _jax_logits(run, ids, mask)
    real = mask.astype(bool)
    assert np.abs(got[real] - want[real]).max() <= F32_TOL


@pytest.mark.slow
def test_bfloat16_export(run, tmp_path):
    out = export(run, tmp_path / "bf16", dtype="bfloat16")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    _, tree = checkpoint.restore_params(run)
    with safe_open(str(out / "model.safetensors"), framework="flax") as f:
        wte = f.get_tensor("transformer.wte.weight")
    assert wte.dtype == jnp.bfloat16
    V = hf.load_config(run / "student").vocab_size  # the real rows of the padded embedding
    np.testing.assert_array_equal(np.asarray(wte, np.float32),
                                  np.asarray(jnp.asarray(tree["student"]["wte"]["embedding"][:V]).astype(jnp.bfloat16),
                                             np.float32))
    ids, mask = _ids(out)
    real = mask.astype(bool)
    in_bf16, bf16_model = _torch_logits(out, ids, mask, dtype="auto")
    assert bf16_model.transformer.wte.weight.dtype == torch.bfloat16
    got, _ = _torch_logits(out, ids, mask)  # the bf16 weights, upcast: exact
    assert np.abs(got[real] - _jax_logits(run, ids, mask, dtype=jnp.bfloat16)[real]).max() <= F32_TOL
    want = _jax_logits(run, ids, mask)
    scale = np.abs(want[real]).max()
    assert np.abs(got[real] - want[real]).max() <= BF16_REL_TOL * scale
    assert np.abs(in_bf16[real] - want[real]).max() <= BF16_REL_TOL * scale
    card = (out / "README.md").read_text()
    n_params = models.param_count(hf.load_config(run / "student"))  # HF's count, no padding
    assert n_params < sum(np.size(x) for x in _leaves(tree["student"]))  # the stored padded rows
    assert "weights in bfloat16" in card and f"{2 * n_params:,} bytes" in card


def _leaves(tree):
    return jax.tree_util.tree_leaves(tree)


@pytest.mark.slow
def test_card_holds_the_runs_real_figures(run, f32_export):
    card = (f32_export / "README.md").read_text()
    summary = json.loads((run / "run_summary.json").read_text())
    assert card.startswith("---\n") and "library_name: transformers" in card
    assert "license:" not in card  # the demo teacher states none: never invented
    assert f"{summary['student']['params']:,} parameters" in card
    assert f"{summary['teacher']['params']:,} parameters" in card
    ev = summary["evaluation"]["heldout"]
    assert f"{ev['student_end']['ppl']:,.2f}" in card and f"{ev['teacher']['ppl']:,.2f}" in card
    assert f"{ev['student_start']['distily_ppl']:,.2f}" in card
    assert f"{summary['dataset']['train']['real_tokens']:,} real tokens" in card
    assert f"{summary['resources']['train_tokens']:,} real tokens in 30 optimizer steps" in card
    assert "checkpoint of step 30" in card and "not the end of the run" not in card
    assert f"| train.batch_size | {json.loads((run / 'config.json').read_text())['train']['batch_size']} |" in card
    student = json.loads((f32_export / "config.json").read_text())
    assert f"| layers | 2 | {student['n_layer']} | 0.500 |" in card  # teacher -> student, from the records
    assert "could not be rendered" not in card
    for section in ("Summary", "Architecture", "Evaluation", "Resource usage", "Train dataset",
                    "Training objective", "Hyperparameters", "Framework versions"):
        assert f"\n## {section}\n" in card


@pytest.mark.slow
def test_earlier_step_and_atomic_replace(run, f32_export, tmp_path, monkeypatch):
    out = export(run, tmp_path / "s20", step=20)
    _, tree = checkpoint.restore_params(run, 20)
    with safe_open(str(out / "model.safetensors"), framework="flax") as f:
        np.testing.assert_array_equal(np.asarray(f.get_tensor("transformer.ln_f.weight")),
                                      np.asarray(tree["student"]["ln_f"]["scale"]))
    card = (out / "README.md").read_text()
    assert "checkpoint of step 20" in card and "not the end of the run (step 30)" in card
    # A failure while writing leaves the earlier export as it was, and no temp folder.
    before = (out / "model.safetensors").read_bytes()
    tok_cls = type(transformers.AutoTokenizer.from_pretrained(run / "tokenizer"))

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tok_cls, "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export(run, out)  # the latest step, would replace step 20
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s20"]


# ----------------------------------------------------------------------------- errors


def test_error_missing_workdir(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export(tmp_path / "nope", tmp_path / "out")
    assert main(["--workdir", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: workdir") and str(tmp_path / "nope") in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_error_workdir_without_checkpoint(tmp_path, capsys):
    wd = tmp_path / "wd"
    (wd / "student").mkdir(parents=True)
    (wd / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="run training first") as e:
        export(wd, tmp_path / "out")
    assert str(wd) in str(e.value)
    assert main(["--workdir", str(wd), "--out", str(tmp_path / "out")]) == 2
    assert "no checkpoint in workdir" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_error_unknown_step_lists_available(run, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 7 .*available steps: 20, 30"):
        export(run, tmp_path / "out", step=7)
    assert main(["--workdir", str(run), "--out", str(tmp_path / "out"), "--step", "7"]) == 2
    assert "available steps: 20, 30" in capsys.readouterr().err


@pytest.mark.slow
def test_error_out_would_replace_the_run_or_a_foreign_folder(run, tmp_path):
    with pytest.raises(ValueError, match="would replace the workdir"):
        export(run, run)
    with pytest.raises(ValueError, match="would replace the workdir"):
        export(run, run.parent)
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="files an export did not write .todo.txt."):
        export(run, foreign)
    assert (foreign / "todo.txt").read_text() == "keep me"
    assert checkpoint.available_steps(run) == [20, 30]
    # The run's own inputs: exporting over the demo teacher would make the next resume train
    # against the student.
    teacher = (run / "teacher" / "model.safetensors").read_bytes()
    for inside in (run / "teacher", run / "tokenizer", run / "data", run / "student" / "x"):
        with pytest.raises(ValueError, match="which the run in .* reads or writes"):
            export(run, inside)
    assert (run / "teacher" / "model.safetensors").read_bytes() == teacher


@pytest.mark.slow
def test_export_never_deletes_files_it_did_not_write(run, f32_export, tmp_path, capsys):
    """An earlier export with a user's notes.txt and sub/ added, and another run's teacher/ (a
    model folder no export wrote): both refused in one line, every file kept."""
    import shutil

    out = tmp_path / "model"
    shutil.copytree(f32_export, out)
    written = json.loads((out / export_lib.MARKER).read_text())["files"]
    assert sorted(p.name for p in out.iterdir()) == sorted(written)  # the marker lists every file
    (out / "notes.txt").write_text("keep me")
    (out / "sub").mkdir()
    (out / "sub" / "x.txt").write_text("me too")
    assert main(["--workdir", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "notes.txt, sub/, sub/x.txt" in err and "choose a new or empty folder" in err
    assert len(err.splitlines()) == 1
    assert (out / "notes.txt").read_text() == "keep me" and (out / "sub" / "x.txt").read_text() == "me too"
    other = tmp_path / "other_run" / "teacher"
    shutil.copytree(run / "teacher", other)
    before = (other / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="files an export did not write .*config.json"):
        export(run, other)
    assert (other / "model.safetensors").read_bytes() == before
    # Without the foreign files, the earlier export is replaced; an empty folder is used.
    (out / "notes.txt").unlink()
    shutil.rmtree(out / "sub")
    assert export(run, out, step=20) == out and "checkpoint of step 20" in (out / "README.md").read_text()
    (tmp_path / "empty").mkdir()
    assert (export(run, tmp_path / "empty") / "model.safetensors").exists()


@pytest.mark.slow
def test_next_export_removes_a_killed_exports_temp_folder(run, tmp_path, capsys):
    import os
    import socket
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # What a SIGKILL-ed export leaves beside --out: its half-written hidden temp folder.
    leftover = tmp_path / f".model.tmp-{socket.gethostname()}-{dead.pid}-0123abcd"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    assert main(["--workdir", str(run), "--out", str(tmp_path / "model")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert os.access(tmp_path / "model" / "config.json", os.R_OK)


# ----------------------------------------------------------------------------- the hub


class _Hub:
    """A local stand-in for the hub: the endpoints upload_folder uses (create repo, branch,
    README metadata validation, preupload, commit), answering preupload with uploadMode
    "regular" so that files come inline (base64) in the commit's NDJSON payload."""

    def __init__(self):
        self.repos, self.branches, self.commits, self.auth, self.unknown = [], [], [], set(), []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        n = int(self.rfile.readline().strip(), 16)
                        chunk = self.rfile.read(n)
                        self.rfile.readline()
                        if n == 0:
                            return data
                        data += chunk
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def _send(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = self._body()
                hub.auth.add(self.headers.get("Authorization"))
                path = self.path.split("?")[0]
                parts = path.strip("/").split("/")
                if path == "/api/repos/create":
                    p = json.loads(body)
                    hub.repos.append(p)
                    repo = f"{p['organization']}/{p['name']}" if p.get("organization") else f"user/{p['name']}"
                    return self._send(200, {"url": f"{hub.url}/{repo}", "name": repo, "id": "1"})
                if path == "/api/validate-yaml":
                    return self._send(200, {"errors": [], "warnings": []})
                if len(parts) >= 6 and parts[:2] == ["api", "models"]:
                    repo, op, rev = "/".join(parts[2:4]), parts[4], "/".join(parts[5:])
                    if op == "preupload":
                        files = json.loads(body)["files"]
                        return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                           "shouldIgnore": False, "oid": None} for f in files]})
                    if op == "branch":
                        hub.branches.append((repo, rev))
                        return self._send(200, {})
                    if op == "commit":
                        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                        files = {v["value"]["path"]: base64.b64decode(v["value"]["content"])
                                 for v in lines if v["key"] == "file"}
                        hub.commits.append({"repo": repo, "revision": rev, "header": lines[0], "files": files,
                                            "other": [v["key"] for v in lines[1:] if v["key"] != "file"]})
                        return self._send(200, {"commitUrl": f"{hub.url}/{repo}/commit/{'a' * 40}",
                                                "commitOid": "a" * 40, "pullRequestUrl": None})
                hub.unknown.append(("POST", self.path))
                self._send(404, {"error": "not found"})

            def do_GET(self):
                if self.path.startswith("/api/agent-harnesses"):  # huggingface_hub's user-agent probe
                    return self._send(404, {"error": "not found"})
                hub.unknown.append(("GET", self.path))
                self._send(404, {"error": "not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def online(monkeypatch, tmp_path):
    """huggingface_hub online (the tests' conftest sets HF_HUB_OFFLINE), no saved token."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    if hasattr(constants, "AGENT_HARNESSES_PATH"):  # a cache huggingface_hub may write: keep it here
        monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    return constants


@pytest.mark.slow
def test_push_uploads_the_folder(run, tmp_path, online, monkeypatch, capsys, caplog):
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # found by huggingface_hub's own resolution
    with _Hub() as hub:
        monkeypatch.setattr(online, "ENDPOINT", hub.url)
        rc = main(["--workdir", str(run), "--out", str(tmp_path / "out"), "--push-to-hub", "me/tiny-student",
                   "--private", "--revision", "dev"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert hub.unknown == []
    assert hub.repos == [{"name": "tiny-student", "organization": "me", "visibility": "private", "type": "model"}]
    assert hub.branches == [("me/tiny-student", "dev")]
    assert hub.auth == {f"Bearer {TOKEN}"}
    (commit,) = hub.commits
    assert commit["repo"] == "me/tiny-student" and commit["revision"] == "dev" and commit["other"] == []
    local = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert set(commit["files"]) == set(local)
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(commit["files"])
    assert commit["files"]["model.safetensors"] == local["model.safetensors"]
    card = commit["files"]["README.md"].decode()
    assert "# me/tiny-student" in card and "from_pretrained('me/tiny-student')" in card
    for text in (captured.out, captured.err, caplog.text, card):
        assert TOKEN not in text
    assert f"pushed to {hub.url}/me/tiny-student/commit/" in captured.out


def test_push_without_token_is_a_clear_error(tmp_path, online):
    out = _fake_export(tmp_path)
    with pytest.raises(PushError, match="no Hugging Face token") as e:
        push_to_hub(out, "me/x", endpoint="http://127.0.0.1:9")
    assert len(str(e.value).splitlines()) == 1 and str(out) in str(e.value)
    assert (out / "model.safetensors").read_bytes() == b"weights"


def test_push_without_network_is_a_clear_error(tmp_path, online):
    out = _fake_export(tmp_path)
    with _Hub() as hub:
        dead = hub.url  # a port that refuses connections once the server is closed
    with pytest.raises(PushError, match="could not push") as e:
        push_to_hub(out, "me/x", token=TOKEN, endpoint=dead)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and TOKEN not in msg and "intact" in msg
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_push_offline_mode_is_a_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PushError, match="offline mode"):
        push_to_hub(_fake_export(tmp_path), "me/x", token=TOKEN)


def test_cli_flags_need_push(tmp_path, capsys):
    assert main(["--workdir", str(tmp_path), "--out", str(tmp_path / "o"), "--private"]) == 2
    assert "need --push-to-hub" in capsys.readouterr().err


def _fake_export(tmp_path):
    out = tmp_path / "exported"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"weights")
    (out / "README.md").write_text("---\nlibrary_name: distil_jax\n---\n# card\n")
    return out


def test_module_is_importable_without_running():
    assert callable(export_lib.export) and callable(export_lib.push_to_hub)
