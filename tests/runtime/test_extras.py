"""Commands whose dependencies come through an extra, run where those are missing: one line naming the extra,
exit 2, no traceback. Each runs through its real entry point in a subprocess that cannot import the modules
(tests/import_blocker.py)."""
import subprocess

from emrrg.assets import chest_dicom
from tests.import_blocker import run_blocked


def assert_one_line(r: subprocess.CompletedProcess, expected: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert expected in lines[0], lines[0]


def test_serve_without_fastapi_names_the_serve_extra(tmp_path):
    r = run_blocked("fastapi", "emrrg.runtime.extras:serve_main", str(tmp_path))
    assert_one_line(r, "pip install 'emrrg[serve]'")
    assert "fastapi" in r.stderr


def test_serve_without_uvicorn_names_the_serve_extra(tmp_path):
    assert_one_line(run_blocked("uvicorn", "emrrg.runtime.extras:serve_main", str(tmp_path)),
                    "pip install 'emrrg[serve]'")


def test_serve_entry_point_is_the_guarded_one():
    """The installed emrrg-serve script goes through the guard, not straight into serve.py (FastAPI at import)."""
    from importlib.metadata import entry_points
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "emrrg-serve"]
    assert ep.value == "emrrg.runtime.extras:serve_main"


def test_run_sr_without_highdicom_names_the_extra(tmp_path):
    out = tmp_path / "sr.dcm"
    r = run_blocked("highdicom", "emrrg.runtime.cli:run_main", str(tmp_path), str(chest_dicom()), "--sr", str(out))
    assert_one_line(r, "pip install 'emrrg[runtime]'")
    assert "--sr" in r.stderr and not out.exists()


def test_serve_with_its_extra_gets_past_the_guard(tmp_path):
    """With FastAPI present the guard lets the real CLI run: its own error for a missing bundle, not the extra's."""
    r = run_blocked("nothing_blocked", "emrrg.runtime.extras:serve_main", str(tmp_path / "no-bundle"))
    assert r.returncode == 2 and "emrrg[serve]" not in r.stderr, r.stderr


def test_scp_without_pynetdicom_names_the_extra(tmp_path):
    r = run_blocked("pynetdicom", "emrrg.runtime.scp:scp_main", str(tmp_path), "--out", str(tmp_path / "out"))
    assert_one_line(r, "pip install 'emrrg[runtime]'")
    assert "pynetdicom" in r.stderr and not (tmp_path / "out").exists()
