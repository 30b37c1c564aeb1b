"""Run-folder logs: what a resume keeps of metrics.jsonl, <tag>.csv and evals.jsonl, and torn lines."""
import csv
import json
import random

from iwm.metrics import CSV_COLUMNS, MetricsWriter


def read_jsonl(path):
    """Strict: every line of the file must be a whole JSON object."""
    text = path.read_text()
    assert text == "" or text.endswith("\n"), "the log does not end with a whole line"
    return [json.loads(line) for line in text.splitlines()]


def _rows(n, seed):
    rng = random.Random(seed)
    return [{"step": s, "epoch": s // 4, "loss": rng.random(), "lr": rng.random() * 1e-3, "wd": 0.04,
             "momentum": 0.99, "img_per_s": rng.random() * 100, "target_std": rng.random(),
             "pred_std": rng.random(), "context_tokens": rng.randint(1, 16), "target_tokens": 4,
             "skipped_images": 0} for s in range(n)]


def _write_run(folder, rows, evals=()):
    w = MetricsWriter(folder, tensorboard=False)
    for row in rows:
        w.log_step(row)
    for step, res in evals:
        w.log_eval(step, res)
    w.close()


def _csv_rows(folder):
    with open(folder / "iwm.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_resume_cuts_logs_back_to_the_checkpoint_step(tmp_path, seed):
    rows = _rows(10, seed)
    resume = random.Random(seed).randint(1, 9)
    ref, run = tmp_path / "uninterrupted", tmp_path / "resumed"
    _write_run(ref, rows[:resume])
    _write_run(run, rows)  # the killed run got further than its checkpoint
    MetricsWriter(run, tensorboard=False, resume_step=resume).close()
    assert read_jsonl(run / "metrics.jsonl") == rows[:resume]
    assert _csv_rows(run) == _csv_rows(ref)
    assert [int(r["step"]) for r in _csv_rows(run)] == list(range(resume))


def test_torn_last_lines_are_dropped_on_resume(tmp_path, seed):
    """A kill mid-write leaves half a line; the resume must neither fail on it nor keep it."""
    rows = _rows(6, seed)
    _write_run(tmp_path, rows)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps(_rows(7, seed)[6])[:17])  # '{"step": 6, "epo'
    with open(tmp_path / "iwm.csv", "a", newline="") as f:
        f.write("6,1,0.5")  # a torn row whose step parses
    with open(tmp_path / "evals.jsonl", "a") as f:
        f.write('{"step": 4, "mr')
    w = MetricsWriter(tmp_path, tensorboard=False, resume_step=6)
    assert read_jsonl(tmp_path / "metrics.jsonl") == rows
    assert [int(r["step"]) for r in _csv_rows(tmp_path)] == list(range(6))
    assert all(r["loss"] for r in _csv_rows(tmp_path))
    w.log_step(_rows(7, seed)[6])  # the resumed run appends a whole line after them
    w.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(7))
    assert [int(r["step"]) for r in _csv_rows(tmp_path)] == list(range(7))


def test_evals_are_cut_back_on_resume(tmp_path, seed):
    """An evaluation at step S runs after the checkpoint at S: a resume at S keeps it and drops later ones."""
    evals = [(s, {"mrr": random.Random(seed + s).random()}) for s in (2, 4, 6)]
    _write_run(tmp_path, _rows(7, seed), evals)
    w = MetricsWriter(tmp_path, tensorboard=False, resume_step=4)
    assert [r["step"] for r in read_jsonl(tmp_path / "evals.jsonl")] == [2, 4]
    assert w.eval_steps == {2, 4}
    w.close()


def test_sync_puts_rows_on_disk_before_a_checkpoint(tmp_path, seed):
    rows = _rows(3, seed)
    w = MetricsWriter(tmp_path, tensorboard=False)
    for row in rows:
        w.log_step(row)
    w.sync()  # what a reader (or a resume after SIGKILL) sees now, without close()
    assert read_jsonl(tmp_path / "metrics.jsonl") == rows
    assert len(_csv_rows(tmp_path)) == 3
    w.close()


def test_csv_with_an_older_header_is_rewritten_to_the_current_columns(tmp_path):
    (tmp_path / "iwm.csv").write_text("step,loss\r\n0,0.5\r\n1,0.4\r\n2,0.3\r\n")
    MetricsWriter(tmp_path, tensorboard=False, resume_step=2).close()
    rows = _csv_rows(tmp_path)
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert [(r["step"], r["loss"]) for r in rows] == [("0", "0.5"), ("1", "0.4")]
