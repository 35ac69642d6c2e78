"""emrrg-batch on real Ray Data: 20 studies made from the real RG1_UNCR.dcm film (new UIDs per study,
downsampled 8x so the tests stay quick), 2 of them broken, through the tiny bundle.

Ray runs for real: once embedded (the command starts its own local Ray with 2 CPUs) and three times through
--address against one simulated two-node cluster (ray.cluster_utils.Cluster, two raylets of 1 CPU each),
shared by those tests. The unit tests above them need pyarrow only.
"""
from __future__ import annotations

import copy
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow", reason="pyarrow comes with the batch extra: pip install emrrg[batch]")
import pyarrow.parquet as pq  # noqa: E402

from emrrg.assets import chest_dicom  # noqa: E402
from emrrg.runtime import batch  # noqa: E402

try:
    import ray  # noqa: F401
    HAVE_RAY = True
except ImportError:
    HAVE_RAY = False
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason="needs Ray Data: pip install emrrg[batch] (CI installs it)")

N_STUDIES = 20
BROKEN = {5: "truncated pixel data", 11: "modality CT"}          # study index -> what is wrong with it
DOWNSAMPLE = 8                  # 1955 x 1841 -> 245 x 231: the gate and decoder paths are the same, 64x fewer pixels
DECODE_ARGS = ["--beams", "1", "--max-new-tokens", "12"]         # short greedy reports: the tests are about Ray
# A run is a fresh Python + Ray start-up (several seconds each) and actors loading the bundle on 2 shared cores
# that other test sessions use too: generous, so a busy machine does not fail a correct run.
RUN_TIMEOUT_S = 420
KILL_AFTER_PARTS = 3            # the killed run has written this many parts (studies) when it is killed
DELAY_S = "1.0"                 # per study in the run that is killed, so it is still running when we kill it
TWO_NODE_DELAY_S = "0.5"        # per study on the two-node cluster: 9 s of work for one actor, > an actor's start-up


# --------------------------------------------------------------------------- the studies

@pytest.fixture(scope="module")
def dicom_tree(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """20 studies under p###/s#/img#.dcm; every third has a second (mirrored, LL) view. Returns the root and
    StudyInstanceUID -> index."""
    import pydicom
    from pydicom.uid import generate_uid

    src = pydicom.dcmread(chest_dicom("RG1_UNCR.dcm"))
    small = src.pixel_array[::DOWNSAMPLE, ::DOWNSAMPLE].copy()
    root = tmp_path_factory.mktemp("archive")
    uids = {}
    for i in range(N_STUDIES):
        study = generate_uid()
        uids[study] = i
        for v in range(2 if i % 3 == 0 else 1):
            ds = copy.deepcopy(src)
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, generate_uid(), generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.PatientID = f"P{i:03d}"
            px = small if v == 0 else small[:, ::-1].copy()
            ds.Rows, ds.Columns = px.shape
            ds.PixelData = px.tobytes()
            if v:
                ds.ViewPosition = "LL"
            if i == 5:
                ds.PixelData = px.tobytes()[: px.nbytes // 2]
            if i == 11:
                ds.Modality = "CT"
            folder = root / f"p{i:03d}" / f"s{v}"
            folder.mkdir(parents=True)
            ds.save_as(folder / f"img{v}.dcm", enforce_file_format=True)
    return root, uids


def manifest_csv(root: Path, path: Path) -> Path:
    """The same studies as a CSV manifest (paths relative to the manifest's folder)."""
    import pydicom

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["study_id", "path"])
        for p in sorted(root.rglob("*.dcm")):
            w.writerow([pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID, os.path.relpath(p, path.parent)])
    return path


def read_out(out: Path) -> list[dict]:
    return pq.read_table(out).to_pylist()


def check_accounted(rows: list[dict], uids: dict[str, int]) -> None:
    """Every study exactly once: 18 reports, and the 2 broken ones as error rows that say why."""
    ids = [r["study_id"] for r in rows]
    assert sorted(ids) == sorted(uids), "a study is missing or written twice"
    for r in rows:
        i = uids[r["study_id"]]
        if i in BROKEN:
            assert r["status"] == "error" and r["report"] is None, r
            assert {5: "truncated", 11: "modality CT"}[i] in r["error"], r["error"]
        else:
            assert r["status"] == "ok" and r["error"] is None, r
            assert r["report"] and r["tokens"] > 0 and r["views"] == (2 if i % 3 == 0 else 1)
    assert len({r["bundle_sha256"] for r in rows}) == 1


# --------------------------------------------------------------------------- without Ray

def test_without_ray_says_how_to_install(tmp_path):
    code = ("import sys; sys.modules['ray'] = None\n"
            "from emrrg.runtime.batch import batch_main\n"
            f"batch_main(['bundle', 'in', '-o', {str(tmp_path / 'out')!r}])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "ray" in lines[0] and "pip install 'emrrg[batch]'" in lines[0], p.stderr


def test_manifest_csv_and_parquet(tmp_path):
    (tmp_path / "imgs").mkdir()
    rows = [("s1", "imgs/a.dcm"), ("s2", "/abs/b.dcm"), ("s1", "imgs/c.dcm")]
    with open(tmp_path / "m.csv", "w", newline="") as f:
        csv.writer(f).writerows([("study_id", "path"), *rows])
    pq.write_table(pa.table({"study_id": [r[0] for r in rows], "path": [r[1] for r in rows]}), tmp_path / "m.parquet")
    want = [batch.Study("s1", (str(tmp_path / "imgs/a.dcm"), str(tmp_path / "imgs/c.dcm"))),
            batch.Study("s2", ("/abs/b.dcm",))]
    assert batch.read_manifest(tmp_path / "m.csv") == want
    assert batch.read_manifest(tmp_path / "m.parquet") == want
    (tmp_path / "bad.csv").write_text("study,file\ns1,a.dcm\n")
    with pytest.raises(batch.BatchError, match="needs the columns study_id, path.*it has study, file"):
        batch.read_manifest(tmp_path / "bad.csv")
    (tmp_path / "empty.csv").write_text("study_id,path\ns1,\n")
    with pytest.raises(batch.BatchError, match="row 1 has an empty"):
        batch.read_manifest(tmp_path / "empty.csv")
    with pytest.raises(batch.BatchError, match="must be .csv, .tsv or .parquet"):
        batch.read_manifest(tmp_path / "m.json")


def test_folder_grouping_by_study_uid(dicom_tree, tmp_path):
    """The gate's header reader groups the files; a file it cannot group is a study of its own."""
    import shutil

    root, uids = dicom_tree
    tree = tmp_path / "tree"
    shutil.copytree(root, tree)
    (tree / "notes.txt").write_text("not an image")
    (tree / ".hidden.dcm").write_bytes(b"skipped")
    (tree / "DICOMDIR").write_bytes(b"skipped too")
    files = batch.list_files(tree)
    assert len(files) == 28 and not any(Path(f).name in (".hidden.dcm", "DICOMDIR") for f in files)
    studies = batch.group_studies(batch.scan_headers(files), tree)
    by_id = {s.study_id: s for s in studies}
    assert set(by_id) == set(uids) | {"notes.txt"}
    for uid, i in uids.items():
        assert len(by_id[uid].paths) == (2 if i % 3 == 0 else 1)
        assert all(f"p{i:03d}" in p for p in by_id[uid].paths)


def test_task_pixels_are_what_preprocess_gives(dicom_tree):
    """The tasks send (V, S, S) gray; the actor's preprocess of those arrays equals preprocess of the files."""
    from emrrg.runtime.preprocess import preprocess

    root, _ = dicom_tree
    paths = [str(p) for p in sorted(root.glob("p000/*/*.dcm"))]
    gray = batch.gray_views(paths, 64, 64.0)
    for g, p in zip(gray, paths):
        assert np.array_equal(preprocess(g, 64), preprocess(p, 64))


@pytest.fixture(scope="module")
def runtime(tiny_bundle):
    from emrrg.runtime.report_runtime import Runtime

    return Runtime.from_pretrained(tiny_bundle, threads=1)


def test_worker_catches_each_study_on_its_own(tiny_bundle, runtime, dicom_tree):
    """ReportWorker without Ray: a refused study and a corrupt pixel payload are error rows, the good study's
    report is the one Runtime.generate writes from the files."""
    from emrrg.runtime.gate import InputPolicy

    root, uids = dicom_tree
    good = [str(p) for p in sorted(root.glob("p001/*/*.dcm"))]
    ct = [str(p) for p in sorted(root.glob("p011/*/*.dcm"))]
    prepared = [batch.prepare_study("good", good, runtime.image_size, InputPolicy()),
                batch.prepare_study("ct", ct, runtime.image_size, InputPolicy())]
    corrupt = dict(prepared[0], study_id="corrupt", pixels=prepared[0]["pixels"][:-4])
    worker = batch.ReportWorker(str(tiny_bundle), 1, "auto", runtime.sha256, {"num_beams": 1, "max_new_tokens": 12},
                                sr=False)
    out = worker(pa.Table.from_pylist(prepared + [corrupt], schema=batch._schemas()[1])).to_pylist()
    assert [r["status"] for r in out] == ["ok", "error", "error"]
    assert out[0]["report"] == runtime.generate(good, num_beams=1, max_new_tokens=12)["report"]
    assert "modality CT" in out[1]["error"] and "cannot reshape" in out[2]["error"]


def test_part_writer_writes_each_study_once(tmp_path):
    w = batch.PartWriter(tmp_path, set())
    row = {k: None for k in batch.result_schema().names}
    rows = [dict(row, study_id=s, status="ok", bundle_sha256="abc", paths=[], warnings=[]) for s in ("a", "b")]
    assert w.write([dict(r) for r in rows]) == 2
    assert w.write([dict(r) for r in rows] + [dict(rows[0], study_id="c")]) == 1
    assert batch.done_keys(tmp_path) == {("a", "abc"), ("b", "abc"), ("c", "abc")}
    assert sorted(r["study_id"] for r in read_out(tmp_path)) == ["a", "b", "c"]


# --------------------------------------------------------------------------- real Ray

def run_batch_cli(bundle, source, out, *extra, env=None, check=True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "emrrg.runtime.batch", str(bundle), str(source), "-o", str(out), *DECODE_ARGS, *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env={**os.environ, **(env or {})})
    if check:
        assert p.returncode == 0, p.stderr[-4000:]
    return p


@needs_ray
def test_embedded_local_ray_18_reports_2_errors_with_srs(tiny_bundle, runtime, dicom_tree, tmp_path):
    import pydicom

    root, uids = dicom_tree
    out = tmp_path / "out"
    p = run_batch_cli(tiny_bundle, root, out, "--workers", "2", "--threads-per-worker", "1", "--sr")
    assert "20 studies written" in p.stderr and "(18 reports, 2 errors)" in p.stderr, p.stderr[-2000:]
    rows = read_out(out)
    check_accounted(rows, uids)
    assert {r["bundle_sha256"] for r in rows} == {runtime.sha256}
    for r in rows:
        if r["status"] != "ok":
            assert r["sr_path"] is None
            continue
        want = runtime.generate(r["paths"], num_beams=1, max_new_tokens=12)
        assert (r["report"], r["tokens"]) == (want["report"], want["tokens"]), r["study_id"]
        sr = pydicom.dcmread(r["sr_path"])
        assert sr.Modality == "SR" and sr.StudyInstanceUID == r["study_id"]
    assert len(list((out / batch.SR_DIR).glob("*.dcm"))) == N_STUDIES - len(BROKEN)
    quiet = run_batch_cli(tiny_bundle, root, out, "--resume", "-q")   # -q: nothing left to do, nothing said
    assert "already in" not in quiet.stderr and "studies written" not in quiet.stderr, quiet.stderr[-2000:]
    assert read_out(out) == rows                                     # and nothing run twice
    again = run_batch_cli(tiny_bundle, root, out, check=False)     # no silent second run into the same OUT
    assert again.returncode == 2 and "--resume" in again.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes of 1 CPU each on this machine, shared by the --address tests."""
    if not HAVE_RAY:
        pytest.skip("needs Ray Data: pip install emrrg[batch] (CI installs it)")
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    c = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c
    c.shutdown()


@needs_ray
def test_two_node_cluster_through_address(tiny_bundle, dicom_tree, cluster, tmp_path):
    root, uids = dicom_tree
    out = tmp_path / "out"
    # A tiny-bundle report takes milliseconds: slowed down (test hook), the work outlasts the second actor's start-up.
    run_batch_cli(tiny_bundle, root, out, "--address", cluster.address, "--workers", "2", "--threads-per-worker", "1",
                  "--batch-size", "2", env={batch.DELAY_ENV: TWO_NODE_DELAY_S})
    rows = read_out(out)
    check_accounted(rows, uids)
    assert len({r["node_id"] for r in rows if r["status"] == "ok"}) == 2, "both nodes' actors should report"


@needs_ray
def test_resume_after_kill_every_study_once(tiny_bundle, dicom_tree, cluster, tmp_path):
    root, uids = dicom_tree
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "emrrg.runtime.batch", str(tiny_bundle), str(root), "-o", str(out), *DECODE_ARGS,
           "--address", cluster.address, "--workers", "2", "--threads-per-worker", "1", "--batch-size", "1"]
    env = {**os.environ, batch.DELAY_ENV: DELAY_S}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while len(list(out.glob(batch.PART_GLOB))) < KILL_AFTER_PARTS:
            assert proc.poll() is None, f"the run ended before it was killed: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no parts written in time"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    first = {p.name: p.read_bytes() for p in out.glob(batch.PART_GLOB)}
    kept = read_out(out)
    assert KILL_AFTER_PARTS <= len(kept) < N_STUDIES, "the kill should land part-way"
    p = run_batch_cli(tiny_bundle, root, out, "--address", cluster.address, "--workers", "2",
                      "--threads-per-worker", "1", "--resume")
    assert f"{len(kept)} already in" in p.stderr
    assert all((out / name).read_bytes() == data for name, data in first.items()), "finished parts must be kept"
    check_accounted(read_out(out), uids)


@needs_ray
def test_worker_exit_on_its_third_study_is_retried(tiny_bundle, dicom_tree, cluster, tmp_path):
    """Fault injection through the documented test hook: one actor process calls os._exit when it starts its
    3rd study; Ray restarts it and retries that batch; every study still ends in exactly one row."""
    root, uids = dicom_tree
    out, flag = tmp_path / "out", tmp_path / "fault-taken"
    source = manifest_csv(root, tmp_path / "studies.csv")
    run_batch_cli(tiny_bundle, source, out, "--address", cluster.address, "--workers", "2", "--threads-per-worker", "1",
                  "--batch-size", "2", env={batch.EXIT_AT_ENV: "3", batch.EXIT_ONCE_ENV: str(flag)})
    assert flag.exists(), "the fault was never injected"
    rows = read_out(out)
    check_accounted(rows, uids)
    assert len({r["worker_pid"] for r in rows if r["status"] == "ok"}) >= 3, "a restarted worker should have reported"


@needs_ray
def test_study_that_kills_its_worker_every_time_is_an_error_row(tiny_bundle, dicom_tree, cluster, tmp_path):
    """A study whose worker dies on every try (test hook EMRRG_BATCH_TEST_EXIT_ON): its batch is dropped after the
    retries, its studies run again one by one, and only the poison study ends as an error row."""
    root, uids = dicom_tree
    good = sorted((i, uid) for uid, i in uids.items() if i not in BROKEN)[:4]
    source = tmp_path / "four.csv"
    with open(source, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["study_id", "path"])
        for i, uid in good:
            w.writerows([uid, str(p)] for p in sorted(root.glob(f"p{i:03d}/*/*.dcm")))
    poison = good[2][1]
    out = tmp_path / "out"
    p = run_batch_cli(tiny_bundle, source, out, "--address", cluster.address, "--workers", "2", "--threads-per-worker",
                      "1", "--batch-size", "2", "--retries", "1", env={batch.EXIT_ON_ENV: poison})
    assert "running them one by one" in p.stderr
    rows = {r["study_id"]: r for r in read_out(out)}
    assert sorted(rows) == sorted(uid for _, uid in good)
    assert rows[poison]["status"] == "error" and rows[poison]["error"].startswith("no result: its Ray task failed 2 times")
    assert all(r["status"] == "ok" for sid, r in rows.items() if sid != poison), \
        {sid: r["error"] for sid, r in rows.items() if r["status"] != "ok"}
