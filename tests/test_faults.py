"""Fault injection on the `seft` driver: folders that hold another run, failed exports (a full
disk through RLIMIT_FSIZE in a subprocess), foreign files, tampered checkpoints, interrupted
runs, and a rank that fails under torchrun. Nothing is lost, nothing silently wrong, nothing hangs."""
import hashlib
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from seft_ext.cli import main  # noqa: E402


def run_args(d, data, out, *extra, steps=6, every=0, command="run"):
    return [command, "--model", str(d), "--data", str(data), "--sparsity", "0.5", "--pattern", "row", "--prune",
            "magnitude", "--method", "seft", "--steps", str(steps), "--seq-len", "16", "--batch-size", "4", "--lr",
            "1e-2", "--update-interval", "2", "--lora-rank", "1", "--eval-windows", "2", "--task-items", "0",
            "--log-every", "1", "--checkpoint-every", str(every), "--out", str(out), "--no-progress", *extra]


def listing(folder: Path) -> dict:
    """{relative path: sha256} of every file under ``folder``."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_id(folder: Path) -> str:
    return json.loads((folder / "run.json").read_text())["run_id"]


def checkpoint_ids(folder: Path) -> set:
    return {json.loads(p.read_text())["meta"]["run_id"] for p in (folder / "checkpoints").glob("step-*.json")}


def last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------- a run owns its folder
def test_a_fresh_run_refuses_another_runs_folder_and_overwrite_replaces_it(tiny_model_dir, tmp_path, capsys):
    d, data = tiny_model_dir
    out = tmp_path / "out"
    assert main(run_args(d, data, out, every=2, steps=6)) == 0  # run A: checkpoints 4, 6
    a_id, before = run_id(out), listing(out)
    # run B (fewer steps: its checkpoints would be the lowest numbers) is refused, nothing touched
    assert main(run_args(d, data, out, "--seed", "1", every=1, steps=2)) == 2
    err = last_error(capsys)
    assert "holds another run's results or checkpoints" in err and "--overwrite" in err
    assert listing(out) == before
    # --overwrite: A's files go, B's checkpoints survive rotation, and --resume continues B, not A
    assert main(run_args(d, data, out, "--seed", "1", "--overwrite", every=1, steps=2)) == 0
    b_id = run_id(out)
    assert b_id != a_id and checkpoint_ids(out) == {b_id}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1.json", "step-1.safetensors",
                                                                       "step-2.json", "step-2.safetensors"]
    assert json.loads((out / "summary.json").read_text())["run_id"] == b_id
    assert main(run_args(d, data, out, "--seed", "1", "--resume", str(out), every=1, steps=2)) == 0
    assert run_id(out) == b_id and json.loads((out / "summary.json").read_text())["seed"] == 1


def test_files_seft_did_not_write_are_never_deleted(tiny_model_dir, tmp_path, capsys, monkeypatch):
    d, data = tiny_model_dir
    monkeypatch.setattr("seft_ext.models.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    # a folder named dense holding the user's own file
    out = tmp_path / "out"
    (out / "dense").mkdir(parents=True)
    (out / "dense" / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        assert main(run_args(d, data, out, *extra)) == 2
        assert "dense/notes.txt was not written by seft" in last_error(capsys)
    assert (out / "dense" / "notes.txt").read_text() == "mine"
    # dense a symbolic link: refused up front, its target untouched
    out2, target = tmp_path / "out2", tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.bin").write_bytes(b"x")
    out2.mkdir()
    (out2 / "dense").symlink_to(target)
    assert main(run_args(d, data, out2, "--overwrite")) == 2
    assert "not a folder seft wrote" in last_error(capsys)
    assert (target / "keep.bin").read_bytes() == b"x" and (out2 / "dense").is_symlink()


def test_overwrite_deletes_nothing_when_the_run_is_refused(tiny_model_dir, tmp_path, capsys):
    d, data = tiny_model_dir
    out, bare = tmp_path / "out", tmp_path / "bare"
    assert main(run_args(d, data, out, steps=2)) == 0
    before = listing(out)
    transformers.AutoModelForCausalLM.from_pretrained(d).save_pretrained(bare)  # no tokenizer
    assert main(run_args(bare, data, out, "--overwrite", steps=2)) == 2
    assert "no tokenizer" in last_error(capsys)
    assert listing(out) == before


def test_outputs_move_in_together_or_not_at_all(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """A failure while the outputs are written aside leaves the folder's earlier outputs whole."""
    d, data = tiny_model_dir
    out = tmp_path / "out"
    assert main(run_args(d, data, out, every=3, steps=6)) == 0
    (out / "checkpoints" / "step-6.json").unlink()  # resume from step 3: the same run, again
    before = {k: v for k, v in listing(out).items() if not k.startswith(("checkpoints/", "log.jsonl"))}

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("seft_ext.hf.export_dense", full_disk)
    assert main(run_args(d, data, out, "--resume", str(out), every=3, steps=6)) == 2
    assert "No space left on device" in last_error(capsys)
    after = {k: v for k, v in listing(out).items() if not k.startswith(("checkpoints/", "log.jsonl"))}
    assert after == before  # summary.json, dense/, sparse.safetensors and run.json as they were
    assert not [p for p in out.iterdir() if p.name.startswith(".seft-") or p.name.endswith(".tmp")]


def _limit_file_size(nbytes):
    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return set_limit


def test_full_disk_during_export_leaves_no_mix(tiny_model_dir, tmp_path, capsys):
    d, data = tiny_model_dir
    out = tmp_path / "out"
    assert main(run_args(d, data, out, steps=2)) == 0
    old_id = run_id(out)
    cmd = [sys.executable, "-m", "seft_ext.cli"] + run_args(d, data, out, "--overwrite", "--seed", "3", steps=2)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, preexec_fn=_limit_file_size(16 << 10))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "File too large" in proc.stderr.strip().splitlines()[-1]
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert names == ["log.jsonl", "run.json"], names  # the new run's files only; no old summary, no leftovers
    assert run_id(out) != old_id


def test_resume_checks_the_contents_of_model_and_data(tiny_model_dir, tmp_path, capsys):
    d, data = tiny_model_dir
    model, text = tmp_path / "model", tmp_path / "text.txt"
    shutil.copytree(d, model)
    shutil.copy(data, text)
    out = tmp_path / "out"
    assert main(run_args(model, text, out, every=2, steps=4)) == 0
    text.write_text(text.read_text().replace("cat", "cow"))  # same name, other contents
    assert main(run_args(model, text, out, "--resume", str(out), every=2, steps=4)) == 2
    assert "the --data files changed" in last_error(capsys)
    shutil.copy(data, text)
    weights = load_file(str(model / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 2
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    assert main(run_args(model, text, out, "--resume", str(out), every=2, steps=4)) == 2
    assert "the --model weights changed" in last_error(capsys)


# ---------------------------------------------------------------------------------- resume integrity
@pytest.fixture(scope="module")
def checkpointed_run(tiny_model_dir, tmp_path_factory):
    """A finished 6-step run with checkpoints at steps 2, 4 and 6 (read-only: copy it to change it)."""
    d, data = tiny_model_dir
    out = tmp_path_factory.mktemp("ckpt") / "run"
    assert main(run_args(d, data, out, "--keep-checkpoints", "3", every=2, steps=6)) == 0
    return out


def _copy_run(src: Path, dst: Path, keep_step: int) -> Path:
    shutil.copytree(src, dst)
    for p in (dst / "checkpoints").iterdir():
        if int(p.name.split(".")[0].split("-")[1]) > keep_step:
            p.unlink()
    return dst


def _retamper(folder: Path, step: int, edit_info=None, edit_tensors=None) -> Path:
    """Rewrite a checkpoint as a tamperer who knows the format would: both JSON copies edited
    alike and the sha256 recomputed."""
    ck = folder / "checkpoints"
    st, js = ck / f"step-{step}.safetensors", ck / f"step-{step}.json"
    with safe_open(str(st), framework="pt") as f:
        info = json.loads(f.metadata()["seft_checkpoint"])
    tensors = load_file(str(st))
    if edit_info:
        edit_info(info)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(st), metadata={"seft_checkpoint": json.dumps(info, sort_keys=True)})
    js.write_text(json.dumps({"sha256": hashlib.sha256(st.read_bytes()).hexdigest(), **info}))
    return st


def _set(path, value):
    def edit(d):
        *head, last = path
        for k in head:
            d = d[k]
        d[last] = value
    return edit


def _swap_first_slots(t):
    key = next(k for k in t if k.endswith(".delta_slots"))
    t[key] = t[key].flip(0).contiguous()


TAMPERED = [
    ("step_beyond_the_run", _set(["step"], 100), None, "step_count 4 differs from step 100"),
    ("run_complete", lambda i: [_set(k, 100)(i) for k in (["step"], ["controller", "step_count"],
                                                          ["controller", "total_steps"])], None, "step 100"),
    ("total_steps", _set(["controller", "total_steps"], 3), None, "total_steps 3 is not an int >= step 4"),
    ("huge_lr", _set(["optimizer_groups", 0, "lr"], 1e9), None, "lr is 1000000000.0 in the checkpoint"),
    ("negative_lr", _set(["optimizer_groups", 0, "lr"], -1.0), None, "lr -1.0 is not a finite number > 0"),
    ("controller_counter", _set(["controller", "step_count"], 1), None, "step_count 1 differs from step 4"),
    ("window_count", _set(["windows", "model.layers.0.self_attn.q_proj", "count"], -5), None, "bad count"),
    ("unsorted_slots", None, _swap_first_slots, "delta_slots not strictly increasing"),
    ("short_rng", None, lambda t: t.update({"rng.torch": t["rng.torch"][:100].clone()}), "rng.torch"),
    ("missing_delta", None, lambda t: t.pop("model.model.layers.1.mlp.up_proj.delta"), "tensor delta missing"),
    ("nan_moment", None, lambda t: t["optim.0.exp_avg"].__setitem__(0, float("nan")), "optim.0.exp_avg"),
    ("stray_tensor", None, lambda t: t.update({"extra": torch.zeros(1)}), "unexpected tensor 'extra'"),
]


@pytest.mark.parametrize("name, edit_info, edit_tensors, match", TAMPERED, ids=[t[0] for t in TAMPERED])
def test_a_tampered_checkpoint_is_refused_naming_its_file(tiny_model_dir, checkpointed_run, tmp_path, capsys, name,
                                                          edit_info, edit_tensors, match):
    d, data = tiny_model_dir
    run = _copy_run(checkpointed_run, tmp_path / "run", keep_step=4)
    st = _retamper(run, 4, edit_info, edit_tensors)
    before = listing(run)
    assert main(run_args(d, data, run, "--resume", str(run), every=2, steps=6)) == 2
    err = last_error(capsys)
    assert match in err and str(st) in err, err
    assert listing(run) == before


def test_an_edited_json_copy_is_not_trusted(tiny_model_dir, checkpointed_run, tmp_path, capsys):
    """Only one copy edited (the hash still matches the tensor file): that checkpoint is skipped."""
    d, data = tiny_model_dir
    run = _copy_run(checkpointed_run, tmp_path / "run", keep_step=4)
    js = run / "checkpoints" / "step-4.json"
    info = json.loads(js.read_text())
    info["step"] = 100
    js.write_text(json.dumps(info))
    with pytest.warns(RuntimeWarning, match="step-4.json differs from the copy inside step-4.safetensors"):
        assert main(run_args(d, data, run, "--resume", str(run), every=2, steps=6)) == 0  # from step 2
    logs = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert logs == [1, 2, 3, 4, 5, 6]  # cut back to step 2, then written again: no duplicates


def test_resume_cuts_the_log_back_and_matches_a_straight_run(tiny_model_dir, checkpointed_run, tmp_path):
    d, data = tiny_model_dir
    run = _copy_run(checkpointed_run, tmp_path / "run", keep_step=2)
    assert main(run_args(d, data, run, "--resume", str(run), "--keep-checkpoints", "3", every=2, steps=6)) == 0
    straight = [json.loads(line) for line in (checkpointed_run / "log.jsonl").read_text().splitlines()]
    resumed = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]


# ---------------------------------------------------------------------------------- interrupts
def _interrupt_at(monkeypatch, at_step):
    """SIGINT to this process during the training step ``at_step`` (a real signal, as from Ctrl-C)."""
    from seft_ext.training import TrainLoop

    real = TrainLoop.step

    def step(self, step):
        if step == at_step:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, step)
    monkeypatch.setattr(TrainLoop, "step", step)


def test_ctrl_c_writes_a_checkpoint_and_prints_the_resume_command(tiny_model_dir, checkpointed_run, tmp_path,
                                                                  capsys, monkeypatch):
    d, data = tiny_model_dir
    out = tmp_path / "out"
    _interrupt_at(monkeypatch, 3)
    argv = run_args(d, data, out, "--keep-checkpoints", "3", every=2, steps=6)
    assert main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("seft: ")]) == 1, err
    line = err[-1]
    assert line.startswith("seft: interrupted after step 3; newest checkpoint: step 3; resume with: seft run ")
    assert (out / "checkpoints" / "step-3.json").is_file() and not (out / "summary.json").exists()
    monkeypatch.undo()
    resume = shlex.split(line.split("resume with: ", 1)[1])
    assert resume[:2] == ["seft", "run"] and resume[-2:] == ["--resume", str(out)]
    assert main(resume[1:]) == 0
    a = load_file(str(checkpointed_run / "dense" / "model.safetensors"))
    b = load_file(str(out / "dense" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # as if never interrupted


def test_ctrl_c_without_checkpoints_and_before_training(tiny_model_dir, tmp_path, capsys, monkeypatch):
    d, data = tiny_model_dir
    _interrupt_at(monkeypatch, 2)
    assert main(run_args(d, data, tmp_path / "a")) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "seft: interrupted after step 2; no checkpoint to resume from (--checkpoint-every N writes them)")

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr("seft_ext.pipeline.evaluate", ctrl_c)
    assert main(run_args(d, data, tmp_path / "b")) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("seft: interrupted; no checkpoint")


# ---------------------------------------------------------------------------------- torchrun
def test_a_failing_rank_ends_the_torchrun_job(tiny_model_dir, tmp_path):
    """Rank 0 cannot write its checkpoint (the file-size limit): every rank stops with the
    message instead of waiting for the others (the job used to hang)."""
    d, data = tiny_model_dir
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "seft_ext.cli"] + run_args(d, data, out, every=2, steps=4)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_limit_file_size(16 << 10), env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        _, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun stops its workers (each in a session of its own) on SIGTERM
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the torchrun job hung after a rank failed")
    assert proc.returncode != 0
    for rank in (0, 1):
        assert f"seft: error (rank {rank}): could not write the checkpoint of step 2" in stderr, stderr[-3000:]
    assert "File too large" in stderr
